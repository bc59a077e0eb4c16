"""Stages for tests of jobs that run in several processes (``executor.resources.<stage>.processes``).

``ranks`` records what each rank sees (its environment, process group, ``ctx.rank``) in the job's
checkpoint folder, logs its rank, can fail on one rank (``fail_rank``) or hold every rank while a
file exists (``hold_while``; a stop request then makes rank 0 write a checkpoint and every rank
raise ``StageInterrupted``). ``tiny_data`` writes test_mlm's tiny tokenizer and dataset for the
real ``train`` stage, which is registered here too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from orchestrator.stage import Registry, StageInterrupted, StageParams, stage
from stages.train import TRAIN

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


class RanksParams(StageParams):
    fail_rank: int = -1  # this rank raises
    hold_while: str = ""  # a path: every rank waits while it exists (or until a stop request)


def _write(path: Any, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    tmp.rename(path)


@stage("ranks", params=RanksParams, outputs={"report": "report"}, checkpoints=True)
def ranks(params: RanksParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Record this rank's view; rank 0 writes the output."""
    seen: dict[str, Any] = {"rank": ctx.rank, "world_size": ctx.world_size, "pid": os.getpid(), "pgid": os.getpgid(0)}
    seen["env"] = {name: os.environ.get(name) for name in ENV}
    try:
        ctx.output_dir("report")
        seen["output_dir"] = "given"
    except RuntimeError as e:
        seen["output_dir"] = str(e)
    ctx.log({"rank": float(ctx.rank)}, step=0)
    _write(ctx.checkpoint_dir / f"rank{ctx.rank}.json", seen)
    if ctx.rank == params.fail_rank:
        raise RuntimeError(f"rank {ctx.rank} fails on purpose")
    while params.hold_while and os.path.exists(params.hold_while):
        if ctx.stop_requested.is_set():
            if ctx.rank == 0:
                _write(ctx.checkpoint_dir / "state.json", {"saved_by": ctx.rank})
            raise StageInterrupted(f"rank {ctx.rank} stopped")
        time.sleep(0.05)
    if ctx.rank != 0:
        return {"report": {"rank": ctx.rank}}  # dropped by the engine
    _write(ctx.output_dir("report") / "report.json", {"world_size": ctx.world_size})
    return {"report": {"rank": ctx.rank, "world_size": ctx.world_size}}


class TinyParams(StageParams):
    languages: list[str] = ["aa", "bb"]
    n_train: int = 16
    n_test: int = 4


@stage("tiny_data", params=TinyParams, outputs={"tokenizer": "tokenizer", "dataset": "dataset"})
def tiny_data(params: TinyParams, inputs: Any, ctx: Any) -> None:
    """test_mlm's word-level tokenizer and synthetic languages (as stage tokenize writes them)."""
    from test_mlm import make_dataset, make_tokenizer

    make_tokenizer(ctx.output_dir("tokenizer"))
    make_dataset(ctx.output_dir("dataset"), langs=tuple(params.languages), n_train=params.n_train, n_test=params.n_test)


def registry() -> Registry:
    return Registry([ranks, tiny_data, TRAIN])
