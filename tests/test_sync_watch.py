"""``python -m orchestrator sync STUDY --watch``: runs uploaded as their jobs end, producers first.

The jobs are REAL: the toy stages run through the real CLI with W&B offline (wandb 0.31 writes the
runs, ``WandbRun.finish`` drops the triggers). No W&B server can run here, so ``wandb`` on PATH is
the FAKE executable of test_sync.py (``fake_wandb_cli``: it records its argv and marks each run
synced as wandb 0.31 does) or the FAKE hung one (``hung_wandb_cli``), and the public API that
declares offline inputs is test_sync.py's FAKE ``FakeApi``. The round-by-round tests use
test_sync.py's stand-in run directories (``make_run``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_sync import FakeApi, all_gone, calls, fake_wandb_cli, hung_pids, hung_wandb_cli, make_run, run_dir
from test_tracking_wandb import wandb_env

from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.records import write_state
from orchestrator.sync_watch import Watch, watch_round
from orchestrator.tracking import wandb_files as wf

LIVE_SPEC = """\
name: live
languages: [en]
stages:
  early: {{stage: emit, params: {{value: 1}}}}
  scaled: {{stage: scale, inputs: {{number: early}}}}
  late: {{stage: emit, params: {{value: 2, hold_while: "{hold}"}}}}
tracking: {{backend: wandb, project: test, mode: offline}}
executor: {{local: {{max_parallel: 2}}}}
stage_package: toystages
"""


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def synced_dirs(log: Path) -> list[str]:
    """Every run directory the fake ``wandb sync`` was given, in call order."""
    return [a for c in calls(log) for a in c["argv"][1:] if not a.startswith("-")]


def job_of(paths: StudyPaths, label: str) -> str:
    [key] = [k for k in os.listdir(paths.dir / "jobs") if json.loads((paths.job(k).record).read_text())["label"] == label]
    return key


@pytest.mark.slow  # three real wandb jobs: about 15 s here
def test_watch_uploads_runs_as_their_jobs_end_producers_first_and_exits_when_all_have_ended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    spec = tmp_path / "live.yaml"
    spec.write_text(LIVE_SPEC.format(hold=hold))
    log = fake_wandb_cli(tmp_path, monkeypatch)
    env = wandb_env(tmp_path)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "orchestrator"]
    submit = subprocess.Popen([*cmd, "submit", str(spec), "--store", str(store)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    paths = StudyPaths(store, "live")
    wait_for("the plan", paths.plan.exists)
    watch = subprocess.Popen([*cmd, "sync", "live", "--store", str(store), "--watch", "--interval", "0.2"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # early and scaled end while late is held: the watch uploads them now, early first
        # (and their triggers removed once handled)
        wait_for("early and scaled uploaded", lambda: len(synced_dirs(log)) >= 2 and not wf.read_ready(paths))
        early, scaled, late = (job_of(paths, label) for label in ("early", "scaled", "late"))
        assert [Path(d).parent.parent.name for d in synced_dirs(log)] == [early, scaled]
        assert watch.poll() is None and submit.poll() is None and hold.exists()
        assert json.loads(paths.job(late).state.read_text())["state"] == "running"
        hold.unlink()
        assert submit.wait(timeout=120) == 0
        out, _ = watch.communicate(timeout=120)
    finally:
        for proc in (submit, watch):
            if proc.poll() is None:
                proc.kill()
    order = [Path(d).parent.parent.name for d in synced_dirs(log)]
    assert order == [early, scaled, late]  # each run once, each after its producer's
    for label in ("early", "scaled", "late"):
        assert f"synced   {label}: wandb/offline-run-" in out
    assert "every job has ended; 3 runs uploaded while watching" in out and "0 synced, 3 skipped, 0 failed" in out
    # no credentials here: scaled's input is declared by a sync with credentials (exit 1 until then, as sync)
    assert "LINEAGE  scaled: W&B API unavailable" in out and watch.returncode == 1, out
    assert wf.read_ready(paths) == {}
    for key in (early, scaled, late):
        marker = json.loads(wf.marker_path(paths, key).read_text())
        assert marker["synced"] == [marker["runs"][0]["dir"]]


# ------------------------------------------------------------------- round by round
def trigger(paths: StudyPaths, key: str) -> None:
    wf.write_ready(paths, key, {"run_id": wf.run_id(paths.study, key), "ok": True})


def one_round(paths: StudyPaths, w: Watch, messages: list[str]) -> Any:
    return watch_round(w, env=dict(os.environ), timeout_s=30, echo=messages.append, api_factory=lambda: FakeApi())


def test_a_run_waits_for_its_producers_upload_and_goes_in_the_round_that_uploads_it(
        wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    for job in plan.jobs:
        make_run(paths, job)
        trigger(paths, job.key)
    emit_en = plan.stage_jobs("emit")[0]
    scale_en, scale_de, scale_fr = plan.stage_jobs("scale")
    total = plan.stage_jobs("total")[0]
    log = fake_wandb_cli(tmp_path, monkeypatch, fail=wf.run_id("toy", emit_en.key))  # emit[en] fails to upload
    w, messages = Watch.of(paths), []
    report = one_round(paths, w, messages)
    assert [c["argv"][1:] for c in calls(log)] == [[run_dir(paths, j) for j in plan.stage_jobs("emit")],
                                                    [run_dir(paths, scale_de), run_dir(paths, scale_fr)]]
    assert [label for label, _ in report.failed] == [emit_en.label] and report.linked == 2
    assert sorted(wf.read_ready(paths)) == sorted([emit_en.key, scale_en.key, total.key])  # kept for the next round
    assert f"waiting  {scale_en.label}: for {emit_en.label}'s W&B run to be uploaded" in messages
    assert f"waiting  {total.label}: for {scale_en.label}'s W&B run to be uploaded" in messages
    [failed] = [m for m in messages if m.startswith("FAILED")]
    assert failed.startswith(f"FAILED   {emit_en.label}: {run_dir(paths, emit_en)}: wandb sync exited 1")
    assert f"(its output: {paths.dir / 'wandb-sync.log'})" in failed and failed.endswith("(retried next round)")
    log.unlink()
    monkeypatch.setenv("FAKE_WANDB_FAIL", "")
    report = one_round(paths, w, messages)
    assert [c["argv"][1:] for c in calls(log)] == [[run_dir(paths, j)] for j in (emit_en, scale_en, total)]
    assert report.ok and report.linked == 4 and wf.read_ready(paths) == {}
    log.unlink()
    assert not one_round(paths, w, messages).synced and not log.exists()  # nothing left: no wandb call


def test_ended_upstream_runs_without_a_trigger_go_first_and_jobs_without_a_run_hold_nothing_up(
        wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    emits, scales, [total] = plan.stage_jobs("emit"), plan.stage_jobs("scale"), plan.stage_jobs("total")
    for job in [*scales, total]:  # the emit jobs were cached: no W&B run
        make_run(paths, job)
    trigger(paths, total.key)  # the scale runs ended in an earlier submission, never synced, no trigger
    log = fake_wandb_cli(tmp_path, monkeypatch)
    report = one_round(paths, Watch.of(paths), [])
    assert [c["argv"][1:] for c in calls(log)] == [[run_dir(paths, j) for j in scales], [run_dir(paths, total)]]
    assert report.ok and len(report.synced) == 4 and wf.read_ready(paths) == {}
    assert not any(wf.marker_path(paths, j.key).exists() for j in emits)


def test_a_run_whose_producer_still_runs_waits(wandb_study: tuple[Plan, StudyPaths], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    emit_en, scale_en = plan.stage_jobs("emit")[0], plan.stage_jobs("scale")[0]
    make_run(paths, emit_en)
    marker = json.loads(wf.marker_path(paths, emit_en.key).read_text())
    wf.marker_path(paths, emit_en.key).write_text(json.dumps({**marker, "finished": False}))  # its run is open
    make_run(paths, scale_en)
    trigger(paths, scale_en.key)
    log = fake_wandb_cli(tmp_path, monkeypatch)
    messages: list[str] = []
    assert not one_round(paths, Watch.of(paths), messages).synced and not log.exists()
    assert messages == [f"waiting  {scale_en.label}: for {emit_en.label}'s W&B run to be uploaded"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_the_upload_in_flight_and_exits_130(
        sig: signal.Signals, wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    emit_en = plan.stage_jobs("emit")[0]
    make_run(paths, emit_en)
    trigger(paths, emit_en.key)
    for job in plan.jobs[1:]:
        write_state(paths, job.key, "queued")
    pids = hung_wandb_cli(tmp_path, monkeypatch)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    watch = subprocess.Popen([sys.executable, "-m", "orchestrator", "sync", "toy", "--store", str(paths.root), "--watch",
                              "--interval", "0.2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for("the upload to start", lambda: pids.exists() and len(hung_pids(pids)) == 2, timeout_s=60)
        watch.send_signal(sig)
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 130, out + err
    assert "interrupted: 0 runs uploaded; run sync (or sync --watch) again to go on" in out and "Traceback" not in err
    assert all_gone(hung_pids(pids))
    assert sorted(wf.read_ready(paths)) == [emit_en.key]  # still to upload
