"""Tiny, fast stages for engine tests (not part of the package): numbers in, numbers out.

``emit`` writes a value, ``scale`` multiplies one upstream value, ``total`` sums many,
``flaky`` fails on demand. Each writes ``value.json`` so tests can follow data through lineage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from orchestrator.stage import Input, Registry, StageParams, stage


class EmitParams(StageParams):
    value: float = 1.0
    language: str = "en"
    sleep_s: float = 0.0


class ScaleParams(StageParams):
    factor: float = 2.0
    language: str = "en"
    fail: bool = False


class TotalParams(StageParams):
    label: str = "sum"


def _read(inp: Any) -> float:
    return json.loads((inp.path / "value.json").read_text())["value"]


def _write(ctx: Any, name: str, value: float, **extra: Any) -> Mapping[str, Mapping[str, Any]]:
    out = ctx.output_dir(name)
    (out / "value.json").write_text(json.dumps({"value": value, **extra}, sort_keys=True))
    ctx.log({"value": value})
    return {name: {"value": value}}


@stage("emit", params=EmitParams, outputs={"number": "number"})
def emit(params: EmitParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Write params.value."""
    time.sleep(params.sleep_s)
    return _write(ctx, "number", params.value, language=params.language, seed=ctx.seed)


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


def registry() -> Registry:
    return Registry([emit, scale, total])
