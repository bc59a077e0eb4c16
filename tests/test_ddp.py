"""Jobs in several processes (``executor.resources.<stage>.processes``): the engine's ranks, and the
real ``train`` stage data-parallel on CPU (gloo) through the real runner and local executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from orchestrator.executors import LocalExecutor
from orchestrator.exitcodes import EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan, build_plan
from orchestrator.ranks import rank_environment, ranks_outcome, stage_processes
from orchestrator.records import JobRecord, read_state, write_job_record
from orchestrator.runner import open_store
from orchestrator.spec import load_study

RANKS_SPEC = """\
name: ranks
languages: [aa]
stage_package: rankstages
executor:
  resources:
    ranks: {{processes: 2, cpus: 2}}
stages:
  ranks:
    params: {params}
"""


def _setup(spec_text: str, tmp_path: Path, root: str = "root") -> tuple[Plan, LocalExecutor, Path]:
    spec = tmp_path / f"{root}.yaml"
    spec.write_text(spec_text)
    study, registry = load_study(spec)
    plan = build_plan(study, registry)
    paths = StudyPaths(tmp_path / root, study.name)
    return plan, LocalExecutor(paths, open_store(tmp_path / root), max_parallel=1, echo=lambda _: None), spec


def _job(plan: Plan, stage_id: str) -> Any:
    return next(j for j in plan.jobs if j.stage_id == stage_id)


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ------------------------------------------------------------------------------ pure parts


def test_process_count_defaults_to_one_per_gpu() -> None:
    assert stage_processes(None, gpus=0) == 1
    assert stage_processes(None, gpus=1) == 1
    assert stage_processes(None, gpus=4) == 4
    assert stage_processes(2, gpus=4) == 2


def test_rank_environment_is_torchrun_s_and_shares_the_threads() -> None:
    env = rank_environment(1, 2, 29511, {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "x"})
    assert env["RANK"] == env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29511")
    assert env["OMP_NUM_THREADS"] == "4" and "MKL_NUM_THREADS" not in env  # (not a number: left as it is)
    assert rank_environment(0, 4, 1, {"OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in rank_environment(0, 2, 1, {})


@pytest.mark.parametrize(
    ("ended", "expected"),
    [
        ([(1, 0), (0, 0)], (EXIT_OK, "")),
        ([(0, EXIT_INTERRUPTED), (1, EXIT_INTERRUPTED)], (EXIT_INTERRUPTED, "")),
        ([(1, 0), (0, EXIT_INTERRUPTED)], (EXIT_INTERRUPTED, "")),
        ([(0, EXIT_ABORTED), (1, -9)], (EXIT_ABORTED, "")),  # the others killed after it do not count
        ([(1, 1), (0, -9)], (EXIT_FAILED, "rank 1 of 2 exited with code 1; the other ranks were stopped")),
        ([(0, EXIT_INTERRUPTED), (1, -11)], (EXIT_FAILED, "rank 1 of 2 was killed by SIGSEGV; the other ranks were stopped")),
    ],
)
def test_the_first_rank_that_fails_decides_the_exit_code(ended: list[tuple[int, int]], expected: tuple[int, str]) -> None:
    assert ranks_outcome(ended, 2) == expected


def test_shard_rows_split_a_batch_like_array_split() -> None:
    import numpy as np

    from stages.train_data import shard_rows

    for rows in range(0, 9):
        for world in (1, 2, 3):
            parts = [shard_rows(rows, r, world) for r in range(world)]
            expected = [(int(a[0]), int(a[-1]) + 1) if len(a) else None for a in np.array_split(np.arange(rows), world)]
            assert [p if p[0] < p[1] else None for p in parts] == expected
            assert parts[0][0] == 0 and parts[-1][1] == rows


# ------------------------------------------------------------------------------ the engine's ranks


def test_two_ranks_one_run_one_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan, ex, spec = _setup(RANKS_SPEC.format(params="{}"), tmp_path)
    assert ex.submit(plan, spec).ok
    job = _job(plan, "ranks")
    jp = ex.paths.job(job.key)
    seen = [json.loads((jp.checkpoint / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world_size"]) for s in seen] == [(0, 2), (1, 2)]
    assert [s["env"]["RANK"] for s in seen] == ["0", "1"] and {s["env"]["WORLD_SIZE"] for s in seen} == {"2"}
    assert {s["env"]["MASTER_ADDR"] for s in seen} == {"127.0.0.1"} and len({s["env"]["MASTER_PORT"] for s in seen}) == 1
    assert {s["env"]["OMP_NUM_THREADS"] for s in seen} == {"1"}  # the job's 2 CPUs (or fewer), shared
    assert seen[0]["pgid"] == seen[1]["pgid"] == seen[0]["pid"] != seen[1]["pid"]  # one group: rank 0's
    assert seen[0]["output_dir"] == "given" and "only rank 0 writes" in seen[1]["output_dir"]
    ref = ex.store.job_outputs(job.key)["report"]
    assert json.loads((ex.store.materialize(ref) / "report.json").read_text()) == {"world_size": 2}
    assert ex.store.get(ref).metadata == {"rank": 0, "world_size": 2}  # rank 0's metadata
    rows = [json.loads(line) for line in jp.metrics.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == [{"rank": 0.0, "step": 0}]  # rank 0's alone


def test_a_failing_rank_stops_the_others_and_fails_the_job(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.write_text("")  # rank 0 would wait for ever (as in a collective with a dead peer)
    plan, ex, spec = _setup(RANKS_SPEC.format(params=f'{{fail_rank: 1, hold_while: "{hold}"}}'), tmp_path)
    start = time.monotonic()
    report = ex.submit(plan, spec)
    assert time.monotonic() - start < 30
    job = _job(plan, "ranks")
    assert job.key in report.failed and read_state(ex.paths, job.key).state == "failed"
    log = ex.paths.job(job.key).log.read_text()
    assert "RuntimeError: rank 1 fails on purpose" in log
    assert "FAILED (rank 1 of 2 exited with code 1; the other ranks were stopped)" in log
    rank0 = json.loads((ex.paths.job(job.key).checkpoint / "rank0.json").read_text())
    assert not _alive(rank0["pid"])
    assert ex.store.job_outputs(job.key) is None


def test_a_stop_signal_reaches_every_rank(tmp_path: Path) -> None:
    """SLURM's USR2 to ``run-job``: every rank is asked to stop, rank 0 checkpoints, all exit 3."""
    hold = tmp_path / "hold"
    hold.write_text("")
    plan, ex, _ = _setup(RANKS_SPEC.format(params=f'{{hold_while: "{hold}"}}'), tmp_path)
    job = _job(plan, "ranks")
    record = write_job_record(ex.paths, JobRecord.from_job(job, plan, ex.paths.root))
    jp = ex.paths.job(job.key)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run-job", str(record)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((jp.checkpoint / f"rank{r}.json").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert out.count("received SIGUSR2: asking the stage to checkpoint and stop") == 2
    assert "ranks (rank 1 of 2): interrupted after a checkpoint (rank 1 stopped)" in out
    assert json.loads((jp.checkpoint / "state.json").read_text()) == {"saved_by": 0}
    assert ex.store.job_outputs(job.key) is None


# ------------------------------------------------------------------------------ train, data-parallel

TRAIN_SPEC = """\
name: ddp
languages: [aa, bb]
seed: 11
stage_package: rankstages
executor:
  resources:
    train: {{processes: {processes}, cpus: 2}}
stages:
  data:
    stage: tiny_data
    params: {{languages: [aa, bb, cc], n_train: 11}}
  train:
    inputs:
      dataset: {{stage: data, output: dataset}}
      tokenizer: {{stage: data, output: tokenizer}}
    params: {params}
"""
# no dropout: two ranks then train exactly as one process does, up to float rounding
TRAIN_PARAMS = {
    "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "max_steps": 10, "batch_size": 8, "lr": 1e-2, "eval_every": 5, "eval_batch_size": 4, "log_every": 1,
    "checkpoint_every": None, "bootstrap_resamples": 10,
}  # batch 8 of 33 chunks: steps of 8 rows (4 per rank) and, last in each epoch, of 1 (rank 1: none)


def test_train_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from stagekit import FakeContext, make_input, run_stage

    from stages import mlm
    from stages.train import TRAIN

    plan, ex, spec = _setup(TRAIN_SPEC.format(processes=2, params=json.dumps(TRAIN_PARAMS)), tmp_path)
    report = ex.submit(plan, spec)
    job = _job(plan, "train")
    log = ex.paths.job(job.key).log.read_text()
    assert report.ok, log[-3000:]
    assert "train (rank 1 of 2)" not in log  # (nothing failed on rank 1)
    ref = ex.store.job_outputs(job.key)["model"]
    assert [v.ref.version for v in ex.store.versions(ref.name)] == [0]  # one commit
    out = ex.store.materialize(ref)
    two = json.loads((out / "metrics.json").read_text())
    # rank 0 alone logs: each step's loss once
    lines = [json.loads(line) for line in ex.paths.job(job.key).metrics.read_text().splitlines()]
    assert sorted(r["step"] for r in lines if "train/loss" in r) == list(range(1, 11))
    losses = [r["train/loss"] for r in lines if "train/loss" in r]
    assert two["mean_loss_after"] < two["mean_loss_before"] - 0.05 and sum(losses[-3:]) < sum(losses[:3])

    # the same job in one process, on the same inputs
    data = ex.store.job_outputs(_job(plan, "data").key)
    inputs = {name: make_input(ex.store.materialize(data[name]), name) for name in ("dataset", "tokenizer")}
    ctx = FakeContext(tmp_path / "one", seed=job.seed)
    run_stage(TRAIN, TRAIN_PARAMS, ctx, inputs)
    one = json.loads((tmp_path / "one" / "outputs" / "model" / "metrics.json").read_text())
    assert two["best_step"] == one["best_step"]
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert h2["select_mean_loss"] == pytest.approx(h1["select_mean_loss"], rel=1e-5)
        assert h2["mean_loss"] == pytest.approx(h1["mean_loss"], rel=1e-5)
    one_losses = [m["train/loss"] for m, _ in ctx.metrics if "train/loss" in m]
    assert losses == pytest.approx(one_losses, rel=1e-5)  # (measured: within 2e-6)
    a, b = mlm.load_model(tmp_path / "one" / "outputs" / "model").state_dict(), mlm.load_model(out).state_dict()
    for k in a:
        assert b[k].float().sub(a[k].float()).abs().max() < 5e-5, k  # (measured: within 1e-5)
    assert os.environ.get("WORLD_SIZE") is None  # (nothing leaked into the test process)


def _run_job(record: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "run-job", str(record)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_train_on_two_ranks_stops_at_one_step_and_resumes(tmp_path: Path) -> None:
    """USR2 (SLURM's time limit) mid-training: both ranks stop after the same step, rank 0 writes
    the checkpoint, the job exits 3; run again, both ranks resume from it and finish."""
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from orchestrator.runner import run_job

    params = {**TRAIN_PARAMS, "max_steps": 150, "eval_every": None, "log_every": 1}
    plan, ex, _ = _setup(TRAIN_SPEC.format(processes=2, params=json.dumps(params)), tmp_path)
    data, train = _job(plan, "data"), _job(plan, "train")
    assert run_job(write_job_record(ex.paths, JobRecord.from_job(data, plan, ex.paths.root))) == EXIT_OK
    record = write_job_record(ex.paths, JobRecord.from_job(train, plan, ex.paths.root))
    metrics = ex.paths.job(train.key).metrics
    proc = _run_job(record)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and "train/loss" in metrics.read_text():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    state = json.loads((ex.paths.job(train.key).checkpoint / "train_state" / "state.json").read_text())
    step = state["state"]["step"]
    assert 0 < step < 150 and state["reason"] == "stop requested", out
    for rank in (0, 1):  # the same step on both
        assert f"train (rank {rank} of 2): interrupted after a checkpoint (train: stop requested; checkpoint at step {step}/150" in out

    proc = _run_job(record)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_OK, out[-3000:]
    assert out.count(f"train: resuming from step {step}/150") == 1  # (rank 0 says it)
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sorted(r["step"] for r in logged if "train/loss" in r) == list(range(1, 151))  # each step once
    ref = ex.store.job_outputs(train.key)["model"]
    assert json.loads((ex.store.materialize(ref) / "metrics.json").read_text())["steps"] == 150
