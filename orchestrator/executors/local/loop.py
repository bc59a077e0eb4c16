"""The local executor's loop: start jobs as their dependencies succeed and CPUs allow, reap them,
enforce time limits, skip what a failure leaves unreachable, and stop everything on a stop signal
(see the package docstring for what each signal does)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing.connection
import os
import signal
import threading
import time
from bisect import insort
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from orchestrator.executors.base import SubmitReport
from orchestrator.exitcodes import EXIT_ABORTED, EXIT_INTERRUPTED
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.procutil import alive, parent_of
from orchestrator.progress_study import Counts
from orchestrator.records import JobState, State, now, recorded_attempt, write_state

from .live import LiveView, Snapshot

if TYPE_CHECKING:
    from orchestrator.executors.local import LocalExecutor

POLL_S = 0.5  # upper bound on a wait: job exits, signals and time limits wake the loop at once
STOP_POLL_S = 0.1  # while stopping: how often to look again at a job whose fork server has gone
SUBMIT_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # see the package docstring
FORKSERVER_GONE = 255  # the exit code that multiprocessing reports for every job once its fork server has died


@dataclass
class _Running:
    """A job process started by the loop."""

    proc: BaseProcess
    pid: int
    started: float  # time.monotonic()
    server: int | None  # its parent when started (the fork server), where /proc tells
    deadline: float | None  # when it runs out of time (resources.time_min); None: no limit
    timed_out: bool = False
    kill_at: float | None = None  # timed out: when SIGKILL follows the SIGTERM it was sent

    def still_running(self) -> bool:
        """Whether the job's process has not ended. A fork server that has died (a signal to
        the submitter's whole process group kills it) reports every job ended with exit code
        255: then the job's process tells."""
        rc = self.proc.exitcode
        return rc is None or (rc == FORKSERVER_GONE and alive(self.pid))

    def orphaned(self) -> bool:
        """Whether its fork server has died: then the job was sent SIGTERM already (its
        parent-death signal), and a second one would stop a stage before it checkpoints."""
        return self.server is not None and parent_of(self.pid) not in (None, self.server)


class _StopSignals:
    """SIGINT, SIGTERM and SIGHUP, recorded while a submit's loop runs instead of acted upon.

    Python's SIGINT handler raises KeyboardInterrupt wherever the main thread is (between
    starting a job process and recording it, say: an orphan), and SIGTERM and SIGHUP would end
    the submitter at once, leaving its jobs to run on with nobody to stop or record them. Each
    signal is appended to ``received`` and wakes the loop through a pipe (``fds``) that it waits
    on along with the jobs' sentinels. The previous handlers come back on exit. A signal that is
    ignored (``nohup`` ignores SIGHUP) stays ignored. Only the main thread runs signal handlers:
    elsewhere nothing is installed.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.fds: list[int] = []
        self._write_fd = -1
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        read_fd, self._write_fd = os.pipe()
        for fd in (read_fd, self._write_fd):
            os.set_blocking(fd, False)
        self.fds = [read_fd]
        for sig in SUBMIT_STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored on purpose (nohup, `cmd &`): leave it so
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
        for fd in (*self.fds, self._write_fd):
            if fd >= 0:
                os.close(fd)

    def _handle(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        with contextlib.suppress(OSError):  # a full pipe: the loop has a wake-up pending anyway
            os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        """Empty the wake-up pipe, so that only a new signal wakes a wait on ``fds``."""
        for fd in self.fds:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 512):
                    pass

    def cause(self) -> str:
        """What stopped the submit, in words."""
        sig = signal.Signals(self.received[0])
        return "Ctrl-C" if sig == signal.SIGINT else sig.name


class _Run:
    """The scheduling loop of one submit.

    Each waiting job counts its dependencies that have not succeeded yet and joins ``ready`` (in
    plan order) when that count reaches 0, so a job's exit costs the loop O(its dependents), not a
    scan of every waiting job (~1 ms a job at 1,000 jobs).
    """

    def __init__(
        self,
        executor: LocalExecutor,
        plan: Plan,
        todo: list[str],
        cached: set[str],
        force: bool,
        report: SubmitReport,
        view: LiveView | None = None,
    ) -> None:
        """``view``: what is shown while it runs (default: plain lines through the executor's echo,
        no periodic status line)."""
        self.ex, self.plan, self.force, self.report = executor, plan, force, report
        self.view = view or LiveView(executor.paths, plan, executor.max_parallel, executor.echo, "plain", interval=float("inf"))
        self.waiting = dict.fromkeys(todo)  # an ordered set: plan order
        self.running: dict[str, _Running] = {}
        self.exited: list[tuple[str, int, float, bool]] = []  # reaped, state not written yet: (key, rc, seconds, timed out)
        self.total, self.ended = len(todo), 0
        resources = {key: plan.study.executor.resources_for(plan.by_key[key].stage_id, plan.by_key[key].point) for key in todo}
        self.cpus = {key: min(r.cpus, executor.cpus) for key, r in resources.items()}
        self.time_min = {key: r.time_min for key, r in resources.items() if r.time_min}  # all of a job's attempts together
        self.retries = {key for key, r in resources.items() if r.retries}  # the runner retries inside the job's process
        self.order = {key: i for i, key in enumerate(todo)}
        self.unmet: dict[str, int] = {}  # waiting job -> how many of its dependencies have not succeeded
        self.dependents: dict[str, list[str]] = {}  # job -> the waiting jobs that depend on it
        for key in todo:
            self._index(key, cached)
        self.ready = [key for key in todo if not self.unmet[key]]
        self.unwritable = False  # a state write has failed (reported once)

    def _index(self, key: str, cached: set[str]) -> None:
        deps = [d for d in self.plan.by_key[key].deps if d not in cached]
        self.unmet[key] = len(deps)
        for dep in deps:
            self.dependents.setdefault(dep, []).append(key)

    def loop(self) -> None:
        with _StopSignals() as stop:
            try:
                self._start_ready()
                while self.running and not stop.received:
                    self._wait(stop)
                    if stop.received:  # before reaping: a group signal may have killed the fork server (see _stop_all)
                        break
                    self._reap()
                    self._enforce_time_limits()
                    self._start_ready()  # refill the slots first: a state write can take milliseconds
                    self._record_exited()
                    self.view.tick(self._snapshot)
            except KeyboardInterrupt:  # from a caller's own handler (a sweep agent's, on SIGUSR2): stop alike
                stop.received.append(signal.SIGINT)
            self._record_exited()
            if stop.received:
                self._stop_all(stop)
                self.report.interrupted = True
            self._skip_unreachable(f"submit was interrupted by {stop.cause()}" if stop.received else "submit was interrupted")
            self.view.close()

    def _snapshot(self) -> Snapshot:
        """What the live view shows: the counts, how long each running job has run, what waits."""
        r, clock = self.report, time.monotonic()
        ended = len(r.skipped) + len(r.cancelled)
        counts = Counts(len(r.succeeded), len(self.running), len(r.failed), len(self.waiting), ended, self.total)
        return Snapshot(counts, {key: clock - job.started for key, job in self.running.items()}, list(self.waiting))

    def _wait(self, stop: _StopSignals) -> None:
        """Until a job exits, a signal comes, the next time limit falls due or POLL_S passes."""
        timeout = POLL_S
        due = [t for job in self.running.values() for t in (job.deadline, job.kill_at) if t is not None]
        if due:
            timeout = min(timeout, max(0.0, min(due) - time.monotonic()))
        multiprocessing.connection.wait([job.proc.sentinel for job in self.running.values()] + stop.fds, timeout=timeout)

    def _start_ready(self) -> None:
        """Start ready jobs, in plan order, while slots and CPUs (each job's resources.cpus) allow."""
        i = 0
        while i < len(self.ready) and len(self.running) < self.ex.max_parallel:
            key = self.ready[i]
            in_use = sum(self.cpus[k] for k in self.running)
            if self.running and in_use + self.cpus[key] > self.ex.cpus:
                i += 1  # does not fit now; a smaller job further on may
                continue
            del self.ready[i]
            del self.waiting[key]
            self._start(key)

    def _start(self, key: str) -> None:
        proc = self.ex._launch(key, self.force, self.cpus[key])
        pid = proc.pid or 0  # set once started
        started = time.monotonic()
        minutes = self.time_min.get(key)
        deadline = started + minutes * self.ex.time_unit_s if minutes else None
        self.running[key] = _Running(proc, pid, started, parent_of(pid), deadline)  # from here on, a signal stops it
        self._write(key, "running", external_id=str(pid))

    def _reap(self) -> None:
        """Move exited jobs from ``running`` to ``exited``; a success makes its dependents ready."""
        for key, job in list(self.running.items()):
            rc = job.proc.exitcode
            if rc is None or job.still_running():
                continue
            job.proc.close()
            del self.running[key]
            if rc == 0:
                self._release_dependents(key)
            self.exited.append((key, rc if rc >= 0 else 128 - rc, time.monotonic() - job.started, job.timed_out))

    def _enforce_time_limits(self) -> None:
        """SIGTERM to each job past its time limit; SIGKILL once it has had ``grace_s`` to end."""
        now = time.monotonic()
        for key, job in self.running.items():
            if job.deadline is not None and now >= job.deadline:
                job.deadline, job.timed_out, job.kill_at = None, True, now + self.ex.grace_s
                _signal_group(job.proc, signal.SIGTERM)
                self.view.say(
                    f"TIMEOUT  {self.plan.by_key[key].label}: ran past its time_min of {self._minutes(key)} min; stopping it "
                    f"(SIGTERM, then SIGKILL after {self.ex.grace_s:.0f}s)"
                )
            elif job.kill_at is not None and now >= job.kill_at:
                job.kill_at = None
                _signal_group(job.proc, signal.SIGKILL)

    def _minutes(self, key: str) -> int | None:
        return self.time_min.get(key)

    def _release_dependents(self, key: str) -> None:
        for dep in self.dependents.pop(key, ()):
            self.unmet[dep] -= 1
            if not self.unmet[dep] and dep in self.waiting:
                insort(self.ready, dep, key=self.order.__getitem__)

    def _record_exited(self) -> None:
        while self.exited:
            self._finished(*self.exited.pop(0))

    def _attempt(self, key: str) -> int | None:
        """The last attempt of a job that may retry, as its runner noted it (None: the first)."""
        return recorded_attempt(self.ex.paths, key) if key in self.retries else None

    def _finished(self, key: str, rc: int, seconds: float, timed_out: bool) -> None:
        job = self.plan.by_key[key]
        self.ended += 1
        attempt = self._attempt(key)
        attempts = f", {attempt} attempts" if attempt else ""
        if rc == 0:  # also a job that finished in its grace after its time ran out: its outputs are committed
            self.report.succeeded.append(key)
            self.view.note(f"[{self.ended}/{self.total}] done    {job.label} ({seconds:.1f}s{attempts})")
            self.view.finished(key)
            self._write(key, "succeeded", exit_code=0, attempt=attempt)
            return
        log = self.ex.paths.job(key).log
        self.report.failed[key] = log
        state: State = "timeout" if timed_out else "interrupted" if rc in (EXIT_INTERRUPTED, EXIT_ABORTED) else "failed"
        if timed_out:
            self.view.say(
                f"[{self.ended}/{self.total}] TIMEOUT  {job.label} (ran past its time_min of {self._minutes(key)} min, "
                f"exit {rc}{attempts}); log: {log}; to give it longer, raise executor.resources.{job.stage_id}.time_min"
            )
        else:
            self.view.say(f"[{self.ended}/{self.total}] {state.upper()}  {job.label} (exit {rc}{attempts}); log: {log}")
        self._write(key, state, exit_code=rc, attempt=attempt)
        self._skip_dependents(key)

    def _skip_dependents(self, key: str) -> None:
        """Skip every waiting job downstream of ``key`` (none of them is ready: each still waits
        for ``key`` or for another job downstream of it)."""
        for dep in self.plan.downstream({key}):
            if dep in self.waiting:
                del self.waiting[dep]
                self.ended += 1
                self.report.skipped.append(dep)
                failed = self.plan.by_key[key].label
                self._write(dep, "skipped", message=f"upstream {failed} failed")
                self.view.say(f"skipped {self.plan.by_key[dep].label}: upstream {failed} failed")

    def _skip_unreachable(self, message: str) -> None:
        for key in self.waiting:
            self.report.cancelled.append(key)
            self._write(key, "cancelled", message=message)
        self.waiting.clear()

    def _stop_all(self, stop: _StopSignals) -> None:
        """SIGTERM to every running job (so stages can checkpoint), ``grace_s`` for them to end (a
        second signal cuts it short), SIGKILL for what is left; record them as cancelled."""
        cause, jobs = stop.cause(), list(self.running.items())
        self.view.say(
            f"interrupted: stopping {len(jobs)} running jobs ({cause} received; SIGTERM to each, "
            f"then SIGKILL after {self.ex.grace_s:.0f}s)"
        )
        for _, job in jobs:
            if not (job.timed_out or job.orphaned()):  # either has been sent SIGTERM already
                _signal_group(job.proc, signal.SIGTERM)
        self._await_stopped([job for _, job in jobs], time.monotonic() + self.ex.grace_s, stop)
        for key, job in jobs:
            if job.still_running():
                _signal_group(job.proc, signal.SIGKILL)
                job.proc.join()
            attempt = self._attempt(key)
            if job.proc.exitcode == 0:  # it ended (and committed) just before it could be stopped
                self.report.succeeded.append(key)
                self._write(key, "succeeded", exit_code=0, attempt=attempt)
                continue
            if job.timed_out:
                self.report.failed[key] = self.ex.paths.job(key).log
            else:
                self.report.cancelled.append(key)
            state: State = "timeout" if job.timed_out else "cancelled"
            self._write(key, state, exit_code=job.proc.exitcode, message=f"stopped by {cause}", attempt=attempt)
        self.running.clear()

    def _await_stopped(self, jobs: list[_Running], deadline: float, stop: _StopSignals) -> None:
        """Wait until every job has ended or ``deadline`` has passed, or another signal comes."""
        signals = len(stop.received)
        stop.drain()
        while (left := [job for job in jobs if job.still_running()]) and time.monotonic() < deadline:
            if len(stop.received) > signals:
                self.view.say(f"{signal.Signals(stop.received[-1]).name} received as well: killing the {len(left)} jobs left now")
                return
            sentinels = [job.proc.sentinel for job in left if job.proc.exitcode is None]
            timeout = max(0.0, min(STOP_POLL_S, deadline - time.monotonic()))  # a negative one would wait forever
            multiprocessing.connection.wait(sentinels + stop.fds, timeout=timeout)
            stop.drain()

    def _write(self, key: str, state: State, **fields: Any) -> None:
        """Record a job's state. On a full disk (or any other failed write) the loop must go on
        reaping and stopping jobs, so the failure is reported once and the state is rewritten in
        place instead (see ``_overwrite_state``)."""
        try:
            write_state(self.ex.paths, key, state, executor=self.ex.name, **fields)
        except OSError as e:
            if not self.unwritable:
                self.unwritable = True
                self.view.say(
                    f"warning: cannot write job states under {self.ex.paths.dir / 'jobs'}: {e.strerror or e}; "
                    "going on (states that cannot be rewritten in place are removed, not left stale)"
                )
            _overwrite_state(self.ex.paths, key, state, executor=self.ex.name, **fields)


def _overwrite_state(paths: StudyPaths, key: str, state: State, **fields: Any) -> None:
    """Rewrite a job's state file in place, after the atomic write (a new file, then a rename)
    failed: on a full disk the old file's blocks take the new state (a few hundred bytes) with no
    new ones on most filesystems, at the price of atomicity. Failing that, remove the file: no
    state is better than a wrong one, e.g. "running" for a job that has ended."""
    path = paths.job(key).state
    doc = JobState(state=state, updated_at=now(), **fields).model_dump(mode="json")
    data = (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY)  # neither O_CREAT nor O_TRUNC: keep the blocks it has
        try:
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(f"short write to {path}")
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ processes
def _signal_group(proc: BaseProcess, sig: signal.Signals) -> None:
    """Signal a job's process group, or the job's process itself before it has made one (setsid
    is its first step, but a signal may come first)."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, sig)
    except PermissionError:
        pass
