"""``python -m orchestrator sync STUDY``: which run directories, in which order, what is reported.

No W&B server can run here, so ``wandb`` on PATH is a FAKE executable (``fake_wandb_cli``) that
records its argv and, like wandb 0.31, leaves ``run-<id>.wandb.synced`` next to each run it
synced; the public API used to declare offline inputs is the FAKE ``FakeApi``, whose calls are
checked against the real ``wandb.Api`` signatures. A hung upload (an unreachable server) is the
FAKE ``HUNG_WANDB``, which starts a child and never returns. Run directories here are stand-ins;
see test_tracking_wandb.py for the same command on real offline runs.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator import sync
from orchestrator.paths import StudyPaths
from orchestrator.plan import Job, Plan
from orchestrator.procutil import alive
from orchestrator.records import write_state
from orchestrator.sync import levels, sync_study
from orchestrator.tracking import wandb as wb

FAKE_WANDB = """\
import json, os, pathlib, sys
# FAKE wandb CLI for tests: records argv, marks each given run directory synced like wandb 0.31
argv = sys.argv[1:]
with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
    f.write(json.dumps({"argv": argv, "has_key": bool(os.environ.get("WANDB_API_KEY"))}) + "\\n")
fail, rc = os.environ.get("FAKE_WANDB_FAIL"), 0
for arg in argv[1:]:
    if arg.startswith("-"):
        continue
    if fail and fail in arg:
        rc = 1
        continue
    for log in pathlib.Path(arg).glob("*.wandb"):
        log.with_suffix(".wandb.synced").touch()
sys.exit(rc)
"""


def fake_wandb_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str = "") -> Path:
    """Put the FAKE ``wandb`` first on PATH; returns the file where it logs each call."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "wandb"
    exe.write_text(f"#!{sys.executable}\n{FAKE_WANDB}")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "fake-wandb-calls.jsonl"
    monkeypatch.setenv("FAKE_WANDB_LOG", str(log))
    monkeypatch.setenv("FAKE_WANDB_FAIL", fail)
    return log


class FakeApi:
    """A FAKE ``wandb.Api`` (no server here): ``run(path).use_artifact(artifact(name))`` is recorded."""

    default_entity = "me"

    def __init__(self, missing: tuple[str, ...] = ()) -> None:
        self.uses: list[tuple[str, str]] = []
        self.missing = missing

    def run(self, path: str = "") -> Any:
        import wandb
        from wandb.apis.public.runs import Run as RealRun

        inspect.signature(wandb.Api.run).bind(self, path)
        api = self

        class Run:
            def use_artifact(self, artifact: Any, use_as: str | None = None) -> Any:
                inspect.signature(RealRun.use_artifact).bind(self, artifact)
                api.uses.append((path, artifact.name))
                return artifact

        return Run()

    def artifact(self, name: str, type: str | None = None) -> Any:
        import wandb

        inspect.signature(wandb.Api.artifact).bind(self, name, type=type)
        if any(m in name for m in self.missing):
            raise LookupError(f"artifact {name} not found")
        return SimpleNamespace(name=name, type=type)


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def make_run(paths: StudyPaths, job: Job, *, mode: str = "offline", uploaded: bool = False,
             state: str = "succeeded") -> Path:
    """What WandbRun leaves for one job: a run directory with a .wandb log, and wandb-run.json."""
    rid = wb.run_id(paths.study, job.key)
    name = f"wandb/{'offline-run' if mode == 'offline' else 'run'}-20260101_000000-{rid}"
    run_dir = paths.job(job.key).dir / name
    run_dir.mkdir(parents=True)
    (run_dir / f"run-{rid}.wandb").write_bytes(b":W&B\xe1\xbe\x00")
    inputs = [{"ref": "x:v0", "artifact": f"toy.{u.job_key[:4]}", "alias": f"job-{u.job_key[:16]}", "type": "number",
               "digest": "d", "linked": False} for b in job.inputs for u in b.upstream]
    marker = {"run_id": rid, "project": "test", "entity": None, "label": job.label, "mode": mode,
              "runs": [{"dir": name, "mode": mode, "uploaded": uploaded}], "synced": [], "inputs": inputs,
              "outputs": [], "errors": [], "finished": True}
    wb.marker_path(paths, job.key).write_text(json.dumps(marker))
    write_state(paths, job.key, state)  # type: ignore[arg-type]
    return run_dir


def run_dir(paths: StudyPaths, job: Job) -> str:
    return str(next(paths.job(job.key).dir.glob("wandb/*run-*")))


def test_one_wandb_sync_per_dag_level_producers_first_then_offline_inputs_are_declared(
        wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    for job in plan.jobs:
        make_run(paths, job)
    log = fake_wandb_cli(tmp_path, monkeypatch)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    api = FakeApi()
    report = sync_study(paths, echo=lambda _: None, api_factory=lambda: api)
    assert report.ok and len(report.synced) == 7 and not report.skipped
    assert [c["argv"] for c in calls(log)] == [
        ["sync", *(run_dir(paths, j) for j in plan.stage_jobs(s))] for s in ("emit", "scale", "total")]
    assert all(c["has_key"] for c in calls(log)) and all("k" * 40 not in " ".join(c["argv"]) for c in calls(log))
    # 3 scale jobs declare 1 input each, total declares 3: the W&B lineage graph is the study's DAG
    assert report.linked == 6
    total = plan.stage_jobs("total")[0]
    assert sorted(a for r, a in api.uses if r == f"me/test/{wb.run_id('toy', total.key)}") == sorted(
        f"me/test/toy.{j.key[:4]}:job-{j.key[:16]}" for j in plan.stage_jobs("scale"))
    marker = json.loads(wb.marker_path(paths, total.key).read_text())
    assert marker["synced"] == [marker["runs"][0]["dir"]] and all(i["linked"] for i in marker["inputs"])
    again = sync_study(paths, echo=lambda _: None, api_factory=lambda: api)
    assert again.ok and not again.synced and len(again.skipped) == 7 and again.linked == 0
    assert len(calls(log)) == 3 and "already synced" in again.skipped[0][1]


def test_levels_follow_the_dag() -> None:
    jobs = [{"key": "a", "deps": []}, {"key": "b", "deps": ["a"]}, {"key": "c", "deps": []},
            {"key": "d", "deps": ["b", "c"]}]
    assert levels(jobs) == {"a": 0, "b": 1, "c": 0, "d": 2}


def test_what_is_skipped_and_online_runs_whose_upload_did_not_finish(
        wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    emit_en, emit_de, emit_fr = plan.stage_jobs("emit")
    scale_en, scale_de, scale_fr = plan.stage_jobs("scale")
    make_run(paths, emit_en, mode="online", uploaded=True)  # finished online: nothing to upload
    make_run(paths, emit_de, mode="online", uploaded=False)  # finish timed out: upload it now
    synced = make_run(paths, emit_fr)
    (synced / f"run-{wb.run_id('toy', emit_fr.key)}.wandb.synced").touch()  # `wandb sync` ran before
    make_run(paths, scale_en, state="running")
    make_run(paths, scale_de)
    # scale_fr and total: never ran with W&B (no wandb-run.json)
    log = fake_wandb_cli(tmp_path, monkeypatch)
    report = sync_study(paths, echo=lambda _: None, api_factory=lambda: FakeApi())
    assert [c["argv"] for c in calls(log)] == [["sync", "--include-online", run_dir(paths, emit_de)],
                                                ["sync", run_dir(paths, scale_de)]]
    skipped = dict(report.skipped)
    assert "uploaded online" in skipped[emit_en.label] and "already synced" in skipped[emit_fr.label]
    assert "still running" in skipped[scale_en.label]
    assert "no W&B run" in skipped[scale_fr.label] and "no W&B run" in skipped[plan.stage_jobs("total")[0].label]
    assert report.ok and report.linked == 1  # scale_de's input


def test_a_failed_upload_is_reported_and_the_others_go_on(
        wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    for job in plan.jobs:
        make_run(paths, job)
    emit_en = plan.stage_jobs("emit")[0]
    log = fake_wandb_cli(tmp_path, monkeypatch, fail=wb.run_id("toy", emit_en.key))
    api = FakeApi(missing=(f"job-{emit_en.key[:16]}",))  # its artifact never reached W&B
    report = sync_study(paths, echo=lambda _: None, api_factory=lambda: api)
    assert not report.ok and len(calls(log)) == 3 and len(report.synced) == 6
    assert [label for label, _ in report.failed] == [emit_en.label]
    assert "wandb sync exited 1" in report.failed[0][1]
    assert [label for label, _ in report.link_failed] == ["scale[language=en]"]
    assert report.linked == 5  # the other scale jobs and total's 3 inputs
    # the next sync retries only the failed run and the missing lineage
    log.unlink()
    monkeypatch.setenv("FAKE_WANDB_FAIL", "")
    again = sync_study(paths, echo=lambda _: None, api_factory=lambda: FakeApi())
    assert again.ok and [c["argv"] for c in calls(log)] == [["sync", run_dir(paths, emit_en)]] and again.linked == 1


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(NETRC=str(cwd / "no-netrc"), WANDB_CONFIG_DIR=str(cwd / "wandb-config"))
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=120)


def test_cli_dry_run_lists_directories_and_commands_and_runs_nothing(
        wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    for job in plan.jobs:
        make_run(paths, job)
    log = fake_wandb_cli(tmp_path, monkeypatch)
    out = cli("sync", "toy", "--store", str(paths.root), "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not log.exists()
    fake = str(tmp_path / "fake-bin" / "wandb")
    assert f"$ {fake} sync {' '.join(run_dir(paths, j) for j in plan.stage_jobs('emit'))}" in out.stdout
    for job in plan.jobs:
        assert f"would sync {job.label}: {run_dir(paths, job)}" in out.stdout


def test_cli_sync_exits_1_when_an_upload_fails_and_says_what(
        wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    for job in plan.jobs:
        make_run(paths, job)
    total = plan.stage_jobs("total")[0]
    fake_wandb_cli(tmp_path, monkeypatch, fail=wb.run_id("toy", total.key))
    out = cli("sync", "toy", "--store", str(paths.root), cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"FAILED   total: {run_dir(paths, total)}: wandb sync exited 1" in out.stdout
    assert "6 synced, 0 skipped, 1 failed" in out.stdout
    # no credentials here: the inputs stay undeclared until a sync with credentials
    assert "LINEAGE  scale[language=en]: W&B API unavailable" in out.stdout


def test_unknown_study_is_a_clear_error(tmp_path: Path) -> None:
    out = cli("sync", "nope", "--store", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and "no study 'nope'" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------ hung uploads
HUNG_WANDB = """\
import os, signal, subprocess, sys, time
# FAKE wandb CLI standing in for an upload that hangs (an unreachable server): it starts a child
# process (as wandb starts wandb-core) and never returns; with FAKE_WANDB_DEAF=1 both ignore SIGTERM
deaf = os.environ.get("FAKE_WANDB_DEAF") == "1"
if deaf:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\\n"
                          "if sys.argv[1] == '1': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                          "time.sleep(600)", "1" if deaf else "0"])
with open(os.environ["FAKE_WANDB_PIDS"], "a") as f:
    f.write(f"{os.getpid()} {child.pid}\\n")
time.sleep(600)
"""


def hung_wandb_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deaf: bool = False) -> Path:
    """Put the FAKE hung ``wandb`` first on PATH; returns the file where it writes its and its child's pid."""
    bin_dir = tmp_path / "hung-bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "wandb"
    exe.write_text(f"#!{sys.executable}\n{HUNG_WANDB}")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pids = tmp_path / "hung-pids.txt"
    monkeypatch.setenv("FAKE_WANDB_PIDS", str(pids))
    monkeypatch.setenv("FAKE_WANDB_DEAF", "1" if deaf else "0")
    return pids


def hung_pids(pids: Path) -> list[int]:
    return [int(p) for line in pids.read_text().splitlines() for p in line.split()]


def all_gone(pids: list[int], within_s: float = 5.0) -> bool:
    """Whether every process in ``pids`` has ended (a killed process may take a moment to exit)."""
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_hung_upload_is_stopped_after_the_timeout_reported_and_retried_next_time(
        wandb_study: tuple[Plan, StudyPaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    emits = plan.stage_jobs("emit")
    for job in emits:
        make_run(paths, job)
    pids = hung_wandb_cli(tmp_path, monkeypatch)
    started = time.monotonic()
    out = cli("sync", "toy", "--store", str(paths.root), "--timeout", "2", cwd=tmp_path)
    assert out.returncode == 1 and time.monotonic() - started < 30, out.stdout + out.stderr
    for job in emits:
        assert f"FAILED   {job.label}: {run_dir(paths, job)}: wandb sync timed out after 2 s; sync again" in out.stdout
    assert "0 synced, 4 skipped, 3 failed" in out.stdout
    assert all_gone(hung_pids(pids))  # the upload and its child: the whole group
    assert all(json.loads(wb.marker_path(paths, j.key).read_text())["synced"] == [] for j in emits)
    log = fake_wandb_cli(tmp_path, monkeypatch)  # the server is back: the next sync uploads them
    again = sync_study(paths, echo=lambda _: None, api_factory=lambda: FakeApi())
    assert again.ok and len(again.synced) == 3 and [c["argv"][1:] for c in calls(log)] == [[run_dir(paths, j) for j in emits]]


def test_an_upload_deaf_to_sigterm_is_killed(wandb_study: tuple[Plan, StudyPaths], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plan, paths = wandb_study
    make_run(paths, plan.stage_jobs("emit")[0])
    pids = hung_wandb_cli(tmp_path, monkeypatch, deaf=True)
    monkeypatch.setattr(sync, "STOP_GRACE_S", 0.5)
    started = time.monotonic()
    report = sync_study(paths, timeout_s=1, echo=lambda _: None, api_factory=lambda: FakeApi())
    assert time.monotonic() - started < 20 and not report.ok and not report.synced
    assert "timed out after 1 s; sync again" in report.failed[0][1]
    assert len(hung_pids(pids)) == 2 and all_gone(hung_pids(pids))


def test_bad_timeout_and_watch_with_dry_run_are_refused(tmp_path: Path) -> None:
    for args, says in ((["--timeout", "0"], "sync --timeout 0: give a number of seconds above 0"),
                       (["--interval", "nan"], "sync --interval nan: give"), (["--timeout", "1h"], "invalid float value"),
                       (["--watch", "--dry-run"], "--watch uploads as jobs end and has no --dry-run")):
        out = cli("sync", "toy", "--store", str(tmp_path), *args, cwd=tmp_path)
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
