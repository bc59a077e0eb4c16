"""The local executor when its submit is stopped from outside, dies, runs out of disk or of time.

Real processes and real signals throughout: ``python -m orchestrator submit`` as a subprocess,
sent SIGTERM or SIGHUP (as ``kill``, ``timeout``, schedulers and a closed terminal do) or SIGKILL;
a real, tiny tmpfs for a full disk (as root only); real job processes that outlive their time
limit. Jobs are held (the toy ``emit`` stage waits while a file exists) so that a test decides
when they may end, and a resubmit after each mishap must complete with the right result.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli
from test_reliability import _check_complete

from orchestrator.executors import LocalExecutor, local
from orchestrator.paths import StudyPaths
from orchestrator.plan import build_plan
from orchestrator.records import read_state
from orchestrator.runner import open_store
from orchestrator.spec import load_study
from orchestrator.sync_watch import Watch, unfinished

HELD_SPEC = """\
name: held
languages: [en, de, fr]
stage_package: toystages
stages:
  emit:
    matrix: {{language: "${{languages}}"}}
    params: {{value: 3, hold_while: "{hold}"}}
  scale:
    matrix: {{language: "${{languages}}"}}
    inputs: {{number: emit}}
  total:
    inputs: {{numbers: scale}}
"""


# ------------------------------------------------------------------------------ helpers
def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ... (None: gone)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Running, not a zombie (this machine's init may never reap an orphan)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _live_processes() -> dict[int, list[str]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] not in ("Z", "X"):
            out[int(entry.name)] = stat
    return out


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    children: dict[int, list[int]] = {}
    for child, stat in _live_processes().items():
        children.setdefault(int(stat[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _in_sessions(sessions: set[int]) -> list[int]:
    """Live processes in any of these sessions (each job leads one)."""
    return [pid for pid, stat in _live_processes().items() if int(stat[3]) in sessions]


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _states(root: Path, study: str) -> dict[str, dict[str, Any]]:
    jobs = root / "studies" / study / "jobs"
    return {p.parent.name: json.loads(p.read_text()) for p in jobs.glob("*/state.json")}


def _held_spec(tmp_path: Path) -> tuple[Path, Path]:
    """The toy study (total 18) with its emit jobs held until the returned file is deleted."""
    hold = tmp_path / "hold"
    hold.touch()
    spec = tmp_path / "held.yaml"
    spec.write_text(HELD_SPEC.format(hold=hold))
    return spec, hold


@contextlib.contextmanager
def _submit(spec: Path, root: Path) -> Iterator[subprocess.Popen[str]]:
    """A real ``submit`` in a session of its own; whatever it leaves running is killed after (its
    session: the fork server and resource tracker, even once orphaned; each job's session). It
    starts with SIGHUP at its default, as from a terminal, even where pytest runs under ``nohup``
    (whose ignored SIGHUP a submit keeps ignoring, on purpose)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--store", str(root)],
        cwd=spec.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _in_sessions({proc.pid, *_recorded_pids(root)}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def _recorded_pids(root: Path) -> set[int]:
    pids = set()
    for path in root.glob("studies/*/jobs/*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            if pid := json.loads(path.read_text()).get("external_id"):
                pids.add(int(pid))
    return pids


def _running_jobs(proc: subprocess.Popen[str], root: Path, study: str, count: int) -> dict[str, int]:
    """Wait until ``count`` jobs run their stage (the runner has installed its stop handlers and
    said so in the log); return their pids by key."""

    def started() -> bool:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the submit ended early (exit {proc.returncode}):\n{out}{err}")
        running = {k: s for k, s in _states(root, study).items() if s["state"] == "running"}
        logs = [root / "studies" / study / "jobs" / k / "job.log" for k in running]
        return len(running) == count and all(p.exists() and "running stage" in p.read_text() for p in logs)

    _wait_for(f"{count} running jobs", started)
    return {k: int(s["external_id"]) for k, s in _states(root, study).items() if s["state"] == "running"}


def _resubmit_completes(spec: Path, root: Path, study: str = "held") -> None:
    """fsck finds the store clean, a new submit exits 0 and the study's total is 3 x 2 x 3 (as
    after a SIGKILLed submit: ``test_reliability._check_complete``), and every job succeeded."""
    _check_complete(spec, root)
    assert all(s["state"] == "succeeded" for s in _states(root, study).values())


# ------------------------------------------------------------------------------ SIGTERM, SIGHUP
@pytest.mark.parametrize(
    ("sig", "to_group"),
    [
        (signal.SIGTERM, False),  # kill PID, a container runtime
        (signal.SIGTERM, True),  # timeout(1): its whole process group, the fork server included
        (signal.SIGHUP, True),  # a closed terminal: the foreground process group
    ],
    ids=["sigterm", "sigterm-group", "sighup-group"],
)
def test_sigterm_and_sighup_stop_a_submit_like_ctrl_c(tmp_path: Path, sig: signal.Signals, to_group: bool) -> None:
    spec, hold = _held_spec(tmp_path)
    root = tmp_path / "root"
    with _submit(spec, root) as proc:
        jobs = _running_jobs(proc, root, "held", 2)
        spawned = _descendants(proc.pid)  # the fork server, its resource tracker, the jobs
        assert set(jobs.values()) <= set(spawned)
        began = time.monotonic()
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        out, err = proc.communicate(timeout=20)
    assert time.monotonic() - began < 10, "the jobs were not stopped promptly"
    assert proc.returncode == 130, out + err
    assert f"interrupted: stopping 2 running jobs ({sig.name} received" in out
    assert "Traceback" not in out + err
    _wait_for("the submit's processes to end", lambda: not [p for p in spawned if _alive(p)], timeout=5)
    assert not _in_sessions(set(jobs.values())), "a process of a job's session is left"
    states = _states(root, "held")
    assert {k: s["state"] for k, s in states.items()} == dict.fromkeys(states, "cancelled")
    assert all(states[k]["message"] == f"stopped by {sig.name}" for k in jobs)
    waiting = set(states) - set(jobs)
    assert len(waiting) == 5 and all(states[k]["message"] == f"submit was interrupted by {sig.name}" for k in waiting)
    hold.unlink()
    _resubmit_completes(spec, root)


def test_stop_signals_are_ours_only_while_the_loop_runs(tmp_path: Path) -> None:
    """The handlers come back after the loop, and a signal ignored on purpose (nohup) stays so."""
    before = {sig: signal.getsignal(sig) for sig in local.SUBMIT_STOP_SIGNALS}
    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with local._StopSignals() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            assert signal.getsignal(signal.SIGINT) == stop._handle
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)  # recorded, not acted upon
            _wait_for("the signal", lambda: bool(stop.received), timeout=5)
        assert stop.received == [signal.SIGTERM] and stop.cause() == "SIGTERM"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous_hup)
    assert {sig: signal.getsignal(sig) for sig in local.SUBMIT_STOP_SIGNALS} == before


# ------------------------------------------------------------------------------ SIGKILL
def test_without_a_parent_death_signal_a_thread_watches_the_submitter() -> None:
    """The fallback where prctl is missing: a job's thread sends it SIGTERM once its submitter
    has died, also while the dead submitter is a zombie nobody has reaped yet."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    submitter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        watch = threading.Thread(target=local._watch_submitter, args=(submitter.pid,), daemon=True)
        watch.start()
        time.sleep(0.1)
        assert not got  # still running
        _wait_for("SIGTERM", lambda: bool(got), timeout=10)
        assert got == [signal.SIGTERM] and submitter.poll() is not None
    finally:
        submitter.wait()
        signal.signal(signal.SIGTERM, previous)


def test_jobs_stop_when_their_submitter_is_sigkilled(tmp_path: Path) -> None:
    """SIGKILL the submitter alone: its fork server exits, and with it each job is told (its
    parent-death signal), stops, and records that its submitter died; a resubmit completes."""
    spec, hold = _held_spec(tmp_path)
    root = tmp_path / "root"
    with _submit(spec, root) as proc:
        jobs = _running_jobs(proc, root, "held", 2)
        servers = [p for p in _descendants(proc.pid) if (stat := _stat(p)) and int(stat[1]) == proc.pid]
        assert servers, "the submitter has no fork server"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _wait_for("the fork server to exit", lambda: not [p for p in servers if _alive(p)], timeout=5)
        _wait_for("the jobs to stop", lambda: not _in_sessions(set(jobs.values())), timeout=5)
    states = _states(root, "held")
    for key, pid in jobs.items():
        assert states[key]["state"] == "cancelled", states[key]
        assert states[key]["message"] == f"its submitter (pid {proc.pid}) died"
        assert states[key]["external_id"] == str(pid)
    log = (root / "studies" / "held" / "jobs" / next(iter(jobs)) / "job.log").read_text()
    assert f"its submitter (pid {proc.pid}) died; recorded as cancelled" in log
    assert not list((root / "artifacts").glob("jobs/*.json"))
    assert _shown(root) == {"cancelled": 7}  # the 5 that never started: their submit has ended
    hold.unlink()
    _resubmit_completes(spec, root)


def _shown(root: Path, study: str = "held") -> dict[str, int]:
    """What ``status --json`` counts per state."""
    out = cli("status", study, "--store", str(root), "--json", cwd=root.parent)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout)["counts"])


def test_status_tells_the_jobs_of_a_dead_submit_from_live_ones(tmp_path: Path) -> None:
    """SIGKILL the submit and its jobs at once (the OOM killer, a lost node): nobody records how
    they ended. status must not show them pending or running for good (``sync --watch`` waits for
    them): what never started is cancelled, a job whose process is gone failed."""
    spec, hold = _held_spec(tmp_path)
    root = tmp_path / "root"
    with _submit(spec, root) as proc:
        jobs = _running_jobs(proc, root, "held", 2)
        assert _shown(root) == {"pending": 5, "running": 2}  # while the submit lives
        for pid in [*jobs.values(), *_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _wait_for("the jobs to end", lambda: not _in_sessions(set(jobs.values())), timeout=10)
    assert sorted(s["state"] for s in _states(root, "held").values()) == ["pending"] * 5 + ["running"] * 2
    assert _shown(root) == {"cancelled": 5, "failed": 2}
    assert unfinished(Watch.of(StudyPaths(root, "held"))) == []  # sync --watch would not wait for them
    hold.unlink()
    _resubmit_completes(spec, root)


# ------------------------------------------------------------------------------ a full disk
@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full, to the last byte it will take."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
        with pytest.raises(OSError) as full:
            os.write(fd, b"\0")
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_disk_fails_jobs_cleanly_and_a_resubmit_completes(tmp_path: Path) -> None:
    """The store's disk fills up while jobs run: their jobs fail, the submitter cannot write
    their states but goes on, names the failed jobs' logs and exits 1 without a traceback, and
    no state is left saying "running". With space again, a resubmit completes."""
    spec, hold = _held_spec(tmp_path)
    with _tmpfs(tmp_path / "fs", "2m") as fs:
        root = fs / "root"
        filler = fs / "filler"
        with _submit(spec, root) as proc:
            jobs = _running_jobs(proc, root, "held", 2)
            _fill(filler)
            hold.unlink()  # let the jobs go on to write their outputs
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, out + err
        own = [line for line in (out + err).splitlines() if not line.startswith("  | ")]  # not a job log's tail
        assert not [line for line in own if "Traceback" in line], out + err
        assert out.count("warning: cannot write job states") == 1, out
        for key in jobs:
            assert f"log: {root / 'studies' / 'held' / 'jobs' / key / 'job.log'}" in out
        assert "emit[language=en]" in out and "FAILED" in out
        states = _states(root, "held")
        assert states and not [k for k, s in states.items() if s["state"] == "running"], states
        assert all(states[k]["state"] == "failed" for k in jobs), states
        filler.unlink()
        _resubmit_completes(spec, root)


# ------------------------------------------------------------------------------ time limits
LIMITS_SPEC = """\
name: limits
languages: [en]
stage_package: toystages
stages:
  quick: {stage: emit, params: {value: 2}}
  slow: {stage: emit, params: {sleep_s: 60}}
  deaf: {stage: emit, params: {sleep_s: 60, ignore_sigterm: true}}
  after_quick: {stage: scale, inputs: {number: quick}}
  after_slow: {stage: scale, inputs: {number: slow}}
executor:
  local: {max_parallel: 3}
  resources:
    quick: {time_min: 20}
    slow: {time_min: 1}
    deaf: {time_min: 1}
"""


def test_a_job_past_its_time_limit_is_stopped_and_recorded_as_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """time_min (here a "minute" is 0.35 s): a job past it gets SIGTERM on time (the loop wakes
    for it), one deaf to SIGTERM gets SIGKILL after the grace; both end as "timeout", their
    dependents are skipped, and jobs within their limit succeed."""
    spec = tmp_path / "limits.yaml"
    spec.write_text(LIMITS_SPEC)
    study, registry = load_study(spec)
    plan = build_plan(study, registry)
    root = tmp_path / "root"
    said: list[tuple[float, str]] = []
    minute = 0.35
    ex = LocalExecutor(
        StudyPaths(root, study.name),
        open_store(root),
        max_parallel=3,
        grace_s=0.5,
        echo=lambda line: said.append((time.monotonic(), line)),
        cpus=4,
        time_unit_s=minute,
    )
    pids: list[int] = []
    launched: dict[str, float] = {}
    launch = ex._launch

    def launch_and_note(key: str, force: bool, cpus: int) -> Any:
        proc = launch(key, force, cpus)
        pids.append(proc.pid or 0)
        launched[key] = time.monotonic()
        return proc

    monkeypatch.setattr(ex, "_launch", launch_and_note)
    began = time.monotonic()
    report = ex.submit(plan, spec)
    assert time.monotonic() - began < 15
    label = {j.key: j.label for j in plan.jobs}
    key = {j.label: j.key for j in plan.jobs}
    assert sorted(label[k] for k in report.failed) == ["deaf", "slow"]
    assert sorted(label[k] for k in report.succeeded) == ["after_quick", "quick"]
    assert [label[k] for k in report.skipped] == ["after_slow"]
    assert not report.ok and not report.interrupted
    states = {name: read_state(ex.paths, key[name]) for name in key}
    assert {n: s.state for n, s in states.items() if s} == {
        "quick": "succeeded",
        "after_quick": "succeeded",
        "slow": "timeout",
        "deaf": "timeout",
        "after_slow": "skipped",
    }
    assert states["deaf"] and states["deaf"].exit_code == 128 + signal.SIGKILL  # it ignored SIGTERM
    assert states["slow"] and states["slow"].exit_code == 4  # stopped mid-stage by SIGTERM, no checkpoint, nothing committed
    lines = [line for _, line in said]
    told = next(t for t, line in said if line.startswith("TIMEOUT  slow: ran past its time_min of 1 min"))
    assert minute <= told - launched[key["slow"]] < minute + 0.2  # not at the next POLL_S
    for name in ("slow", "deaf"):
        log = ex.paths.job(key[name]).log
        assert any(
            line.startswith("[")
            and f"TIMEOUT  {name} " in line
            and f"log: {log}" in line
            and f"executor.resources.{name}.time_min" in line
            for line in lines
        ), lines
        assert ex.store.job_outputs(key[name]) is None
    assert len(pids) == 4 and not [p for p in pids if _alive(p)]
    assert not _in_sessions(set(pids))
