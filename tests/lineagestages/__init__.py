"""Toy stages (a stage package of their own, for engine tests) that make lineage failures visible: every file a run writes carries that run's token,
every run leaves a line in a run log, and some stages misbehave on purpose (write to their inputs,
keep writing after they returned)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.stage import Input, Registry, StageParams, stage

FILES = 4


class TokensParams(StageParams):
    language: str = "en"
    sleep_s: float = 0.0
    deterministic: bool = False  # the same bytes every run (no token, a fixed value), so a rerun can repair
    write_input: bool = False
    late_write_s: float = 0.0  # > 0: a thread rewrites an output this long after the stage returned
    progress: bool = False  # show a tqdm bar (tqdm makes a multiprocessing lock: a semaphore)


def note_run(label: str, token: str) -> None:
    """One line per stage run in $TOYSTAGES_RUNLOG (O_APPEND: safe across processes)."""
    log = os.environ.get("TOYSTAGES_RUNLOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{label} {token}\n".encode())
        finally:
            os.close(fd)


def _write_tokens(folder: Path, token: str, value: float | None, sleep_s: float) -> None:
    """FILES files, each naming the run; slow enough, with ``sleep_s``, for two runs to overlap."""
    for i in range(FILES):
        (folder / f"part{i}.json").write_text(json.dumps({"token": token, "value": value}))
        time.sleep(sleep_s / FILES)


@stage("tokens", params=TokensParams, outputs={"a": "tokens", "b": "tokens"})
def tokens(params: TokensParams, inputs: Any, ctx: Any) -> None:
    """Two outputs, every file holding this run's token."""
    token = "fixed" if params.deterministic else uuid.uuid4().hex
    note_run(ctx.job_label, uuid.uuid4().hex)
    if params.progress:
        from tqdm import tqdm

        for _ in tqdm(range(3), desc=ctx.job_label):
            pass
    value = 1.0 if params.deterministic else uuid.uuid4().int % 1000
    _write_tokens(ctx.output_dir("a"), token, value, params.sleep_s / 2)
    _write_tokens(ctx.output_dir("b"), token, value, params.sleep_s / 2)
    if params.late_write_s > 0:  # a writer that keeps its file open past the stage's return
        fd = os.open(ctx.output_dir("a") / "part0.json", os.O_WRONLY)

        def rewrite() -> None:
            time.sleep(params.late_write_s)
            os.pwrite(fd, b'{"token": "LATE", "value": -1}', 0)
            os.close(fd)

        threading.Thread(target=rewrite, daemon=False).start()


@stage("follow", params=TokensParams, inputs={"src": Input("tokens")}, outputs={"a": "tokens", "b": "tokens", "seen": "tokens"})
def follow(params: TokensParams, inputs: Any, ctx: Any) -> None:
    """Copy the upstream value into token files of its own, note the sha256 of the bytes it read
    (output ``seen``), and, on request, vandalise its input."""
    token = uuid.uuid4().hex
    note_run(ctx.job_label, token)
    src = inputs["src"].path / "part0.json"
    raw = src.read_bytes()
    (ctx.output_dir("seen") / "src.json").write_text(json.dumps({"token": token, "sha256": hashlib.sha256(raw).hexdigest()}))
    (ctx.output_dir("seen") / "provenance.json").write_text(json.dumps({"token": token, "provenance": ctx.provenance}))
    try:
        value = json.loads(raw)["value"]
    except (ValueError, KeyError):  # damaged bytes: go on, so that what was read gets committed and counted
        value = None
    if params.write_input:
        os.chmod(src, 0o644)  # root could write anyway; anyone else first makes it writable
        src.write_text(json.dumps({"token": "VANDAL", "value": -1}))
    _write_tokens(ctx.output_dir("a"), token, value, params.sleep_s / 2)
    _write_tokens(ctx.output_dir("b"), token, value, params.sleep_s / 2)


def registry() -> Registry:
    return Registry([tokens, follow])
