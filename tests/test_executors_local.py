"""The local executor on real processes: order, caching, failures, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from orchestrator.executors import LocalExecutor, local
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan, build_plan
from orchestrator.records import read_state
from orchestrator.runner import open_store
from orchestrator.spec import load_study


def setup(spec: Path, root: Path, *overrides: str) -> tuple[Plan, LocalExecutor, list[str]]:
    study, registry = load_study(spec, overrides)
    plan = build_plan(study, registry)
    paths = StudyPaths(root, study.name)
    lines: list[str] = []
    return plan, LocalExecutor(paths, open_store(root), max_parallel=2, echo=lines.append), lines


def value_of(executor: LocalExecutor, plan: Plan, label: str) -> float:
    job = next(j for j in plan.jobs if j.label == label)
    ref = executor.store.job_outputs(job.key)[job.outputs[0].name]
    return json.loads((executor.store.materialize(ref) / "value.json").read_text())["value"]


def test_runs_in_order_and_caches_on_resubmit(toy_spec: Path, tmp_path: Path) -> None:
    plan, ex, lines = setup(toy_spec, tmp_path / "root")
    report = ex.submit(plan, toy_spec)
    assert report.ok and len(report.succeeded) == 7 and not report.cached
    assert value_of(ex, plan, "total") == 3 * 2 * 3  # three languages, each 3 x 2
    assert all(read_state(ex.paths, j.key).state == "succeeded" for j in plan.jobs)
    again = ex.submit(plan, toy_spec)
    assert len(again.cached) == 7 and not again.succeeded
    assert "7 of 7 jobs cached (outputs already committed)" in lines
    forced = ex.submit(plan, toy_spec, force=True)
    assert len(forced.succeeded) == 7
    # identical content: forcing a rerun adds no new versions
    job = plan.jobs[-1]
    assert [v.ref.version for v in ex.store.versions(job.outputs[0].artifact)] == [0]


def test_changed_parameter_reruns_only_downstream(toy_spec: Path, tmp_path: Path) -> None:
    plan, ex, _ = setup(toy_spec, tmp_path / "root")
    ex.submit(plan, toy_spec)
    plan2, ex2, _ = setup(toy_spec, tmp_path / "root", "stages.scale.params.factor=10")
    report = ex2.submit(plan2, toy_spec)
    assert len(report.cached) == 3 and len(report.succeeded) == 4
    assert value_of(ex2, plan2, "total") == 3 * 10 * 3
    # the old version is still there: v0 from factor 2, v1 from factor 10
    assert [v.ref.version for v in ex2.store.versions("toy.total.total")] == [0, 1]


def test_failed_job_stops_dependents_and_names_its_log(toy_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOYSTAGES_FAIL", "de")
    plan, ex, lines = setup(toy_spec, tmp_path / "root")
    report = ex.submit(plan, toy_spec)
    labels = {plan.by_key[k].label for k in report.failed}
    assert labels == {"scale[language=de]"}
    assert {plan.by_key[k].label for k in report.skipped} == {"total"}
    assert len(report.succeeded) == 5  # the other branches still ran
    (log,) = report.failed.values()
    assert "RuntimeError: scale failed on purpose for de" in log.read_text()
    assert any(f"log: {log}" in line for line in lines)
    total = next(j for j in plan.jobs if j.label == "total")
    assert ex.store.job_outputs(total.key) is None
    assert read_state(ex.paths, total.key).state == "skipped"
    # fixed: a resubmit reruns only the failed job and what depends on it
    monkeypatch.delenv("TOYSTAGES_FAIL")
    again = ex.submit(plan, toy_spec)
    assert {plan.by_key[k].label for k in again.succeeded} == {"scale[language=de]", "total"}
    assert len(again.cached) == 5


def test_bounded_parallelism(tmp_path: Path) -> None:
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "name: par\nlanguages: [a, b, c, d]\nstage_package: toystages\nstages:\n"
        '  emit:\n    matrix: {language: "${languages}"}\n    params: {sleep_s: 0.6}\n'
    )
    plan, ex, _ = setup(spec, tmp_path / "root")
    report = ex.submit(plan, spec)
    assert report.ok
    # every job's metrics file records when it ran; never more than 2 overlap
    spans = []
    for job in plan.jobs:
        rows = [json.loads(x) for x in ex.paths.job(job.key).metrics.read_text().splitlines()]
        log = ex.paths.job(job.key).log
        spans.append((log.stat().st_ctime - 0.6, rows[0]["time"]))
    ends = sorted(t for _, t in spans)
    assert ends[2] - ends[0] > 0.5  # the third job could only start after one of the first two ended


def test_ctrl_c_stops_running_jobs_cleanly(tmp_path: Path) -> None:
    spec = tmp_path / "slow.yaml"
    spec.write_text(
        "name: slow\nlanguages: [a, b, c]\nstage_package: toystages\nstages:\n"
        '  emit:\n    matrix: {language: "${languages}"}\n    params: {sleep_s: 30}\n'
    )
    root = tmp_path / "root"
    env = {**os.environ}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--store", str(root)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    jobs_dir = root / "studies" / "slow" / "jobs"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [json.loads(p.read_text())["state"] for p in jobs_dir.glob("*/state.json")] if jobs_dir.exists() else []
        if states.count("running") == 2:
            break
        time.sleep(0.05)
    # each running job is a process of its own, leading its own session (once it has called
    # setsid, its first step: "running" is written as soon as the process exists)
    running = [json.loads(p.read_text()) for p in jobs_dir.glob("*/state.json")]
    pids = {int(s["external_id"]) for s in running if s["state"] == "running"}
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while not all(os.getsid(pid) == pid for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(os.getsid(pid) == pid for pid in pids)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted: stopping 2 running jobs" in out
    states = sorted(json.loads(p.read_text())["state"] for p in jobs_dir.glob("*/state.json"))
    assert states == ["cancelled", "cancelled", "cancelled"]
    assert not list((root / "artifacts").glob("jobs/*.json"))  # nothing half-committed


def test_jobs_share_the_cpus_their_resources_ask_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "name: cpus\nlanguages: [a, b, c]\nstage_package: toystages\nstages:\n"
        '  emit:\n    matrix: {language: "${languages}"}\n    params: {sleep_s: 0.5}\n'
        "executor: {local: {max_parallel: 3}, resources: {emit: {cpus: 2}}}\n"
    )
    study, registry = load_study(spec)
    plan = build_plan(study, registry)
    root = tmp_path / "root"
    ex = LocalExecutor(StudyPaths(root, study.name), open_store(root), max_parallel=3, echo=lambda _: None, cpus=3)
    assert ex.submit(plan, spec).ok
    ends = sorted(json.loads(ex.paths.job(j.key).metrics.read_text().splitlines()[0])["time"] for j in plan.jobs)
    assert ends[1] - ends[0] > 0.4 and ends[2] - ends[1] > 0.4  # 2 + 2 > 3 CPUs: one job at a time
    assert {value_of_field(ex, plan, j.label, "threads") for j in plan.jobs} == {"2"}  # OMP_NUM_THREADS = cpus


def value_of_field(executor: LocalExecutor, plan: Plan, label: str, field: str) -> object:
    job = next(j for j in plan.jobs if j.label == label)
    ref = executor.store.job_outputs(job.key)[job.outputs[0].name]
    return json.loads((executor.store.materialize(ref) / "value.json").read_text())[field]


def test_jobs_record_the_code_provenance_their_submitter_computed(
    toy_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Git commit, Python, host and packages come from the submitting process, computed there
    once (per max age), not in each job (two git subprocesses a job); the rest is per job."""
    calls: list[int] = []

    def code() -> dict[str, object]:
        calls.append(1)
        return {"git_commit": "cafe+dirty", "python": "3.x", "host": "here", "packages": {"pydantic": "9.9"}}

    monkeypatch.setattr(local, "code_provenance", code)
    monkeypatch.setattr(local, "CODE_PROVENANCE_MAX_AGE_S", 3600.0)
    plan, ex, _ = setup(toy_spec, tmp_path / "root")
    assert ex.submit(plan, toy_spec).ok
    expected = code()
    for job in plan.jobs:
        version = ex.store.get(ex.store.job_outputs(job.key)[job.outputs[0].name])
        assert version.producer is not None
        assert version.producer.provenance == {
            "spec_hash": plan.study.spec_hash(),
            "job_key": job.key,
            "stage_version": job.stage_version,
            "params": dict(job.params),
            "seed": job.seed,
            **expected,
        }
    assert len(calls) == 2  # once for the whole submit (and once just above)


def test_code_provenance_is_recomputed_once_older_than_its_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    now, cost = [0.0], [0.0]  # a fake clock; computing the provenance takes `cost` on it

    def code() -> dict[str, object]:
        now[0] += cost[0]
        return {"at": now[0]}

    monkeypatch.setattr(local, "code_provenance", code)
    snapshot = local._CodeProvenance(1.0, clock=lambda: now[0])
    assert snapshot.get() == {"at": 0.0}
    now[0] = 1.0
    assert snapshot.get() == {"at": 0.0}  # exactly max_age_s old: still fresh
    now[0] = 1.5
    assert snapshot.get() == {"at": 1.5}
    assert snapshot.get() == {"at": 1.5}
    cost[0] = 0.5  # slow (a huge checkout): at most 5% of the time goes to recomputing it
    now[0] = 3.0
    assert snapshot.get() == {"at": 3.5}
    now[0] = 12.0
    assert snapshot.get() == {"at": 3.5}  # taken 9 s ago, but it took 0.5 s: fresh for 10 s
    now[0] = 13.1
    assert snapshot.get() == {"at": 13.6}
