"""Tiny, fast stages for engine tests (not part of the package): numbers in, numbers out.

``emit`` writes a value, ``scale`` multiplies one upstream value, ``total`` sums many,
``flaky`` fails on demand (its first ``fail_times`` runs of a job, counted in the job's checkpoint
folder, which persists across attempts; -1: every run). Each writes ``value.json`` so tests can
follow data through lineage.
``emit`` can also be held (``hold_while``: it waits while that file exists, so a test decides
when it ends) and made deaf to SIGTERM (``ignore_sigterm``: a hung stage that only SIGKILL stops).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

from orchestrator.stage import Input, Registry, StageInterrupted, StageParams, stage


class EmitParams(StageParams):
    value: float = 1.0
    language: str = "en"
    sleep_s: float = 0.0
    hold_while: str = ""  # a path: wait while it exists
    ignore_sigterm: bool = False


class ScaleParams(StageParams):
    factor: float = 2.0
    language: str = "en"
    fail: bool = False


class TotalParams(StageParams):
    label: str = "sum"


class FlakyParams(StageParams):
    fail_times: int = -1  # fail this many runs of the job, then succeed; -1: fail every run
    language: str = "en"


def _read(inp: Any) -> float:
    return json.loads((inp.path / "value.json").read_text())["value"]


def _write(ctx: Any, name: str, value: float, **extra: Any) -> Mapping[str, Mapping[str, Any]]:
    out = ctx.output_dir(name)
    (out / "value.json").write_text(json.dumps({"value": value, **extra}, sort_keys=True))
    ctx.log({"value": value})
    return {name: {"value": value}}


def fetch_emit(params: EmitParams) -> Iterator[str]:
    """emit's prefetch hook: 'fetches' one item per language, appending each call to the file named by
    $TOYSTAGES_PREFETCH_LOG; fails for the language named by $TOYSTAGES_PREFETCH_FAIL."""
    if os.environ.get("TOYSTAGES_PREFETCH_FAIL") == params.language:
        raise OSError(f"cannot reach the toy hub for {params.language}\nsecond line")
    log = os.environ.get("TOYSTAGES_PREFETCH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{params.language} {params.value}\n")
    yield f"toy data {params.language}"
    yield f"toy value {params.value}"


@stage("emit", params=EmitParams, outputs={"number": "number"}, prefetch=fetch_emit)
def emit(params: EmitParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Write params.value."""
    if params.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while params.hold_while and os.path.exists(params.hold_while):
        time.sleep(0.05)
    time.sleep(params.sleep_s)
    return _write(ctx, "number", params.value, language=params.language, seed=ctx.seed, threads=os.environ.get("OMP_NUM_THREADS"))


@stage("scale", params=ScaleParams, inputs={"number": Input("number")}, outputs={"number": "number"})
def scale(params: ScaleParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Multiply the upstream value by params.factor (or fail, to test failure handling)."""
    if params.fail or os.environ.get("TOYSTAGES_FAIL") == params.language:
        raise RuntimeError(f"scale failed on purpose for {params.language}")
    return _write(ctx, "number", _read(inputs["number"]) * params.factor)


@stage("total", params=TotalParams, inputs={"numbers": Input("number", many=True)}, outputs={"total": "number"})
def total(params: TotalParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Sum every upstream value."""
    values = [_read(i) for i in inputs["numbers"]]
    return _write(ctx, "total", sum(values), parts=len(values))


@stage("flaky", params=FlakyParams, outputs={"number": "number"})
def flaky(params: FlakyParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Fail the job's first params.fail_times runs (every run for -1); then write how many runs it took."""
    counter = ctx.checkpoint_dir / "runs"
    runs = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(runs))
    if params.fail_times < 0 or runs <= params.fail_times:
        raise RuntimeError(f"flaky failed on purpose (run {runs})")
    return _write(ctx, "number", runs, language=params.language)


class CountParams(StageParams):
    steps: int = 10
    sleep_s: float = 0.5


@stage("count", params=CountParams, outputs={"number": "number"}, checkpoints=True)
def count(params: CountParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Count to params.steps, checkpointing when asked to stop; resumes from the checkpoint."""
    state_file = ctx.checkpoint_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "starts": 0}
    state["starts"] += 1
    while state["step"] < params.steps:
        if ctx.stop_requested.is_set():
            state_file.write_text(json.dumps(state))
            raise StageInterrupted(f"stopped at step {state['step']}")
        (ctx.checkpoint_dir / "in_step").touch()  # for a test that must signal it mid-step
        time.sleep(params.sleep_s)
        state["step"] += 1
    return _write(ctx, "number", state["step"], starts=state["starts"])


@stage("chart", params=TotalParams, inputs={"total": Input("number")}, outputs={"figures": "figures"})
def chart(params: TotalParams, inputs: Any, ctx: Any) -> None:
    """A stand-in 'figure' and report page, for the export command."""
    out = ctx.output_dir("figures")
    (out / "total.png").write_bytes(b"\x89PNG\r\n\x1a\n" + str(_read(inputs["total"])).encode())
    (out / "report.html").write_text("<img src='total.png'>")


def registry() -> Registry:
    return Registry([emit, scale, total, count, chart, flaky])
