"""Retries (``executor.resources.<stage>.retries``, Snakemake's restart-times) on the local executor,
with real job processes and real signals: the toy ``flaky`` stage fails its first N runs, counted
in the job's checkpoint folder, which persists across attempts."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from orchestrator.errors import OrchestratorError
from orchestrator.executors import LocalExecutor
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan, build_plan
from orchestrator.records import JobRecord, read_state, write_job_record
from orchestrator.runner import open_store, retry_wait, run_job
from orchestrator.spec import load_study
from orchestrator.views import attempt_text, status_table

SPEC = """\
name: retry
languages: [en]
stage_package: toystages
executor:
  resources:
    flaky: {retries: 2, retry_backoff_s: 0.2}
stages:
  flaky:
    params: {fail_times: 2}
  scale:
    inputs: {number: flaky}
"""


def setup(tmp_path: Path, *overrides: str, time_unit_s: float = 60.0) -> tuple[Plan, LocalExecutor, list[str]]:
    spec = tmp_path / "retry.yaml"
    spec.write_text(SPEC)
    study, registry = load_study(spec, overrides)
    plan = build_plan(study, registry)
    root = tmp_path / "root"
    lines: list[str] = []
    ex = LocalExecutor(StudyPaths(root, study.name), open_store(root), echo=lines.append, grace_s=0.5, time_unit_s=time_unit_s)
    return plan, ex, lines


def key_of(plan: Plan, label: str) -> str:
    return next(j.key for j in plan.jobs if j.label == label)


def test_backoff_doubles_before_each_further_retry() -> None:
    assert [retry_wait(30.0, n) for n in (1, 2, 3)] == [30.0, 60.0, 120.0]
    assert retry_wait(0.0, 4) == 0.0


def test_attempt_text_is_shown_only_for_several_attempts() -> None:
    assert attempt_text("failed", None) == attempt_text("failed", 1) == "failed"
    assert attempt_text("failed", 3) == "failed (3 attempts)"
    assert attempt_text("running", 2) == "running (attempt 2)"


def test_a_job_that_fails_twice_succeeds_on_its_third_attempt(tmp_path: Path) -> None:
    plan, ex, lines = setup(tmp_path)
    report = ex.submit(plan, tmp_path / "retry.yaml")
    assert report.ok and len(report.succeeded) == 2, lines
    key = key_of(plan, "flaky")
    state = read_state(ex.paths, key)
    assert state and state.state == "succeeded" and state.attempt == 3
    assert read_state(ex.paths, key_of(plan, "scale")).attempt is None  # type: ignore[union-attr]  # no retries asked
    log = ex.paths.job(key).log.read_text()
    assert log.count("running stage flaky") == 3
    assert "flaky: attempt 2 of 3 in 0.2 s (attempt 1 failed: RuntimeError: flaky failed on purpose (run 1))" in log
    assert "flaky: attempt 3 of 3 in 0.4 s (attempt 2 failed: RuntimeError: flaky failed on purpose (run 2))" in log
    assert any(line.startswith("[1/2] done    flaky (") and line.endswith(", 3 attempts)") for line in lines), lines
    assert (ex.paths.job(key).checkpoint / "runs").read_text() == "3"  # one checkpoint folder for all attempts
    assert not list((ex.paths.root / "staging").glob("*/*"))  # every attempt's staging folder is gone
    row = next(ln for ln in status_table(ex.paths).splitlines() if ln.startswith("flaky "))
    assert "succeeded (3 attempts)" in row


def test_a_job_that_always_fails_ends_failed_after_retries_plus_one_attempts(tmp_path: Path) -> None:
    plan, ex, lines = setup(tmp_path, "stages.flaky.params.fail_times=-1")
    report = ex.submit(plan, tmp_path / "retry.yaml")
    key = key_of(plan, "flaky")
    assert list(report.failed) == [key] and report.skipped == [key_of(plan, "scale")]
    state = read_state(ex.paths, key)
    assert state and state.state == "failed" and state.exit_code == 1 and state.attempt == 3
    assert ex.paths.job(key).log.read_text().count("running stage flaky") == 3
    assert (ex.paths.job(key).checkpoint / "runs").read_text() == "3"
    assert any("FAILED  flaky (exit 1, 3 attempts); log:" in line for line in lines), lines
    assert ex.store.job_outputs(key) is None


def test_without_retries_a_failed_job_runs_once(tmp_path: Path) -> None:
    plan, ex, lines = setup(tmp_path, "executor.resources.flaky.retries=0", "stages.flaky.params.fail_times=1")
    report = ex.submit(plan, tmp_path / "retry.yaml")
    key = key_of(plan, "flaky")
    assert list(report.failed) == [key]
    state = read_state(ex.paths, key)
    assert state and state.state == "failed" and state.attempt is None
    log = ex.paths.job(key).log.read_text()
    assert log.count("running stage flaky") == 1 and "attempt 2" not in log
    assert any(line.endswith(f"FAILED  flaky (exit 1); log: {ex.paths.job(key).log}") for line in lines), lines
    assert ex.submit(plan, tmp_path / "retry.yaml").ok  # its second run, as before retries existed


def test_sigterm_during_the_backoff_ends_the_job_interrupted_at_once(tmp_path: Path) -> None:
    plan, ex, lines = setup(tmp_path, "executor.resources.flaky.retries=1", "executor.resources.flaky.retry_backoff_s=60")
    key = key_of(plan, "flaky")
    log = ex.paths.job(key).log
    sent: list[float] = []

    def kill_in_backoff() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log.exists() and "attempt 2 of 2 in 60 s" in log.read_text():
                state = read_state(ex.paths, key)
                if state and state.attempt == 2 and state.external_id:
                    sent.append(time.monotonic())
                    os.kill(int(state.external_id), signal.SIGTERM)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_in_backoff)
    killer.start()
    report = ex.submit(plan, tmp_path / "retry.yaml")
    ended = time.monotonic()
    killer.join()
    assert sent and ended - sent[0] < 5, lines  # not after the 60 s backoff
    state = read_state(ex.paths, key)
    assert state and state.state == "interrupted" and state.exit_code == 3 and state.attempt == 2
    assert list(report.failed) == [key] and not report.interrupted  # the job was stopped, not the submit
    text = log.read_text()
    assert text.count("running stage flaky") == 1 and "flaky: stopped by SIGTERM; nothing was committed" in text


def test_the_time_limit_covers_every_attempt(tmp_path: Path) -> None:
    """retries: 9 with backoffs of 0.3 s, 0.6 s, 1.2 s, ...: the 2 s limit ends the job long before."""
    plan, ex, lines = setup(
        tmp_path,
        "executor.resources.flaky.retries=9",
        "executor.resources.flaky.retry_backoff_s=0.3",
        "executor.resources.flaky.time_min=1",
        "stages.flaky.params.fail_times=-1",
        time_unit_s=2.0,
    )
    began = time.monotonic()
    report = ex.submit(plan, tmp_path / "retry.yaml")
    assert time.monotonic() - began < 5, lines
    key = key_of(plan, "flaky")
    state = read_state(ex.paths, key)
    assert state and state.state == "timeout" and state.attempt and 2 <= state.attempt < 10, state
    assert list(report.failed) == [key] and report.skipped == [key_of(plan, "scale")]
    assert any(line.startswith("[1/2] TIMEOUT  flaky (ran past its time_min of 1 min") for line in lines), lines


@pytest.mark.parametrize("problem", ["stage version", "missing upstream"])
def test_bad_input_is_not_retried(tmp_path: Path, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    plan, ex, _ = setup(tmp_path, "executor.resources.flaky.retries=3", "executor.resources.default.retries=3", "executor.resources.default.retry_backoff_s=0")
    job = plan.by_key[key_of(plan, "scale" if problem == "missing upstream" else "flaky")]
    record = JobRecord.from_job(job, plan, ex.paths.root)
    if problem == "stage version":
        record = record.model_copy(update={"stage_version": "0-not-this"})
    assert record.resources.retries == 3
    write_job_record(ex.paths, record)
    with pytest.raises(OrchestratorError, match="submit the study"):
        run_job(ex.paths.job(job.key).record)
    out = capsys.readouterr().out
    assert "attempt 2" not in out and "running stage" not in out
