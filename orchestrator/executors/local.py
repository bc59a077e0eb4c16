"""Run a plan on this machine: one process per job, bounded parallelism, one log file per job.

Job processes are forked from a pre-started server that has already imported the runner (the
``forkserver`` start method), so a job pays for its own stage's imports but not for starting Python
and importing the engine again (~0.2 s a job otherwise). Each job runs what ``python -m orchestrator
run-job JOB.json`` runs (``cli.run_job_command``), in its own session (process group), with stdout
and stderr in its log file. The submitting process computes the code half of provenance (git
commit and package versions: two git subprocesses, ~10 ms) about once a second and hands it to
the jobs it starts, which would otherwise each compute it again.

A failed job stops its dependents (independent jobs go on). A job that runs longer than its
``resources.time_min`` is stopped like an interrupted one (SIGTERM to its process group, so a
stage can checkpoint, then SIGKILL after ``grace_s``) and recorded as ``timeout``, a failure.
A job's ``resources.retries`` are run by the runner inside the job's process, so one progress
line and one time limit cover all of its attempts; the last attempt's number is carried into
the job's final state.

Stopping: while a submit's loop runs, SIGINT (Ctrl-C), SIGTERM (``kill``, ``timeout``, schedulers,
container runtimes) and SIGHUP (a closed terminal) all do the same: SIGTERM to every running job's
process group, ``grace_s`` to end (a second signal cuts it short), SIGKILL for what is left; the
stopped jobs and those still waiting are recorded as ``cancelled`` with the signal's name, and
the submit reports itself interrupted, which ``python -m orchestrator submit`` turns into exit
code 130 whichever of the three signals it was (the one code scripts already test for). The
previous handlers are restored when the loop ends.

If the submitter dies without a chance to stop its jobs (SIGKILL, the OOM killer), its fork
server exits too (its end of a pipe from the submitter closes), and each job is sent SIGTERM:
on Linux the job asks for it as its parent-death signal, elsewhere a thread of the job polls the
submitter. The job then stops (a checkpointing stage checkpoints) and records its own state,
since no one else will.

A state file that cannot be written (a full disk) does not stop the loop: it says so once and
goes on reaping and stopping jobs, rewriting such a state in place or removing it rather than
leaving it stale (a job the disk stopped is just a failed job).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import sys
import threading
import time
from bisect import insort
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactStore
from orchestrator.executors.base import Executor, SubmitReport
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.procutil import alive, parent_of, set_parent_death_signal
from orchestrator.provenance import code_provenance
from orchestrator.records import JobState, State, now, read_state, recorded_attempt, write_state
from orchestrator.runner import EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, JobStopped

POLL_S = 0.5  # upper bound on a wait: job exits, signals and time limits wake the loop at once
STOP_POLL_S = 0.1  # while stopping: how often to look again at a job whose fork server has gone
CODE_PROVENANCE_MAX_AGE_S = 1.0  # how stale the git/packages snapshot handed to a job may be
FORKSERVER_PRELOAD = ("orchestrator.cli", "orchestrator.runner", "orchestrator.executors.local")  # see _context
SUBMIT_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # see the module docstring
SUBMITTER_POLL_S = 0.5  # where there is no parent-death signal: how often a job checks its submitter
FORKSERVER_GONE = 255  # the exit code that multiprocessing reports for every job once its fork server has died


class LocalExecutor(Executor):
    name = "local"

    def __init__(
        self,
        paths: StudyPaths,
        store: ArtifactStore,
        max_parallel: int = 2,
        grace_s: float = 30.0,
        echo: Callable[[str], None] = print,
        cpus: int | None = None,
        time_unit_s: float = 60.0,
    ) -> None:
        """``time_unit_s``: the seconds in one minute of ``resources.time_min``; only tests,
        which cannot wait minutes for a time limit, make it shorter."""
        super().__init__(paths, store)
        self.max_parallel = max_parallel
        self.grace_s = grace_s
        self.echo = echo
        self.cpus = cpus or available_cpus()
        self.time_unit_s = time_unit_s
        self._code = _CodeProvenance(CODE_PROVENANCE_MAX_AGE_S)

    def submit(self, plan: Plan, spec_path: Path, *, force: bool = False) -> SubmitReport:
        todo, cached = self.prepare(plan, spec_path, force)
        report = SubmitReport(cached=sorted(cached))
        if cached:
            self.echo(f"{len(cached)} of {len(plan.jobs)} jobs cached (outputs already committed)")
        if not todo:
            self.echo("nothing to run")
            return report
        self.echo(
            f"running {len(todo)} jobs, at most {self.max_parallel} at a time on {self.cpus} CPUs; "
            f"logs under {self.paths.dir / 'jobs'}"
        )
        _Run(self, plan, todo, cached, force, report).loop()
        return report

    def _launch(self, key: str, force: bool, cpus: int) -> BaseProcess:
        environ = dict(os.environ)
        environ.setdefault("OMP_NUM_THREADS", str(cpus))  # the job's share, as SLURM's cpus-per-task would give
        job = _JobStart(self.paths, key, force, environ, os.getcwd(), self._code.get(), os.getpid())
        proc = _context().Process(target=_job_main, args=(job,), name=f"job-{key[:12]}")
        proc.start()
        return proc


@dataclass(frozen=True)
class _JobStart:
    """What a job process gets from the submitting process (pickled to the forkserver)."""

    paths: StudyPaths
    key: str
    force: bool
    environ: dict[str, str]  # the submitter's environment now (the server was forked earlier)
    cwd: str
    code: dict[str, Any]  # runner.code_provenance() of the submitter
    submitter: int  # its pid: the job stops when it dies


class _CodeProvenance:
    """``code_provenance()`` for the jobs this process starts, recomputed once it is older than
    ``max_age_s`` (or than 20 times what computing it took, so that it never takes more than 5%
    of the loop, e.g. for ``git status`` in a huge checkout): a trivial job no longer pays for two
    git subprocesses, and a job started after the checkout changed in the middle of a long submit
    still records the change."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self._value: dict[str, Any] | None = None
        self._taken = self._cost = 0.0

    def get(self) -> dict[str, Any]:
        now = self.clock()
        if self._value is None or now - self._taken > max(self.max_age_s, 20 * self._cost):
            self._value = code_provenance()
            self._taken, self._cost = now, self.clock() - now
        return self._value


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. inside a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _context() -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    """Fork jobs from a server that imported the engine once (spawn where there is no forkserver).

    The server preloads this module too: it holds the job's entry point, which a job process
    would otherwise import (and, without bytecode caches, compile) for itself. It never preloads
    a stage package, although importing one is a fifth of a trivial job: stages import numpy &
    co., whose thread pools read the job's ``OMP_NUM_THREADS`` when they are imported, and the
    server lives as long as this process, so it would go on forking jobs from stage code that
    has since changed on disk.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return ctx


# ------------------------------------------------------------------------------ the job process
def _job_main(job: _JobStart) -> None:
    """A job process: its own session (so signals reach the whole job), output to its log, then
    what ``python -m orchestrator run-job RECORD`` runs, with the submitter's code provenance."""
    os.setsid()
    _release_fork_server()
    os.environ.clear()
    os.environ.update(job.environ)
    os.chdir(job.cwd)
    job_paths = job.paths.job(job.key)
    _log_to(job_paths.log)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from orchestrator.cli import run_job_command

    try:
        # until the runner installs its own handlers: stop as cleanly as they would (nothing
        # has started yet), not die at once unrecorded
        signal.signal(signal.SIGTERM, _stop_before_the_stage)
        _stop_with_submitter(job.submitter)
        rc = run_job_command(job_paths.record, force=job.force, code=job.code)
    except JobStopped as e:
        print(f"stopped by {e} before the stage started; nothing was committed", flush=True)
        rc = EXIT_INTERRUPTED
    if not alive(job.submitter):
        _record_orphaned(job, rc)
    # SystemExit is how a multiprocessing target sets its exit code while still running the
    # process's finalizers (which release e.g. tqdm's semaphores instead of leaking them)
    sys.exit(rc)


def _log_to(log: Path) -> None:
    """Send stdout and stderr to the job's log; a job that cannot open it (a full disk) fails
    with one line on the submitter's terminal, not a traceback."""
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        print(f"job {log.parent.name[:12]}: cannot open its log {log}: {e.strerror or e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _release_fork_server() -> None:
    """Close this job's copy of the write end of the fork server's "alive" pipe.

    multiprocessing hands one to every process that the server forks, so that the server lives
    on while any of them runs. A job holding it would keep the server alive after its submitter
    was SIGKILLed, and so itself: it learns of its submitter's death by its parent's, the
    server's (see ``_stop_with_submitter``). A stage that starts processes of its own with the
    forkserver method gets a server of its own anyway (this one's address is not inherited).
    """
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)  # private: hence the care
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


def _stop_before_the_stage(signum: int, frame: object) -> None:
    raise JobStopped(signal.Signals(signum).name)


def _stop_with_submitter(submitter: int) -> None:
    """Have SIGTERM sent to this job when its submitter dies, so that it never runs on unwatched.

    The job's parent is the fork server, which exits when the submitter dies, however it dies
    (the end of a pipe that the server watches closes; see ``_release_fork_server``). So on
    Linux the job asks for SIGTERM as its parent-death signal, then checks that the parent it
    saw before asking still lives (if it died in between, no signal would come). Elsewhere a
    thread of the job polls the submitter.
    """
    parent = os.getppid()
    if not set_parent_death_signal(signal.SIGTERM):
        threading.Thread(target=_watch_submitter, args=(submitter,), name="submitter-watch", daemon=True).start()
    elif os.getppid() != parent or not alive(submitter):
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_submitter(submitter: int) -> None:
    while alive(submitter):
        time.sleep(SUBMITTER_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _record_orphaned(job: _JobStart, rc: int) -> None:
    """Record the outcome of a job whose submitter died: no one else will. Only over the state
    that its submitter wrote for this very process, never over a newer submit's."""
    state: State = "succeeded" if rc == EXIT_OK else "failed" if rc == EXIT_FAILED else "cancelled"
    message = f"its submitter (pid {job.submitter}) died"
    print(f"{message}; recorded as {state}", flush=True)
    pid = str(os.getpid())
    with contextlib.suppress(OSError, ValueError):  # ValueError: a state file that is not one
        current = read_state(job.paths, job.key)
        if current is not None and current.state == "running" and current.external_id == pid:
            fields = {"executor": LocalExecutor.name, "external_id": pid, "message": message, "attempt": current.attempt}
            write_state(job.paths, job.key, state, exit_code=rc, **fields)


# -------------------------------------------------------------------------- the submit's loop
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
        self, executor: LocalExecutor, plan: Plan, todo: list[str], cached: set[str], force: bool, report: SubmitReport
    ) -> None:
        self.ex, self.plan, self.force, self.report = executor, plan, force, report
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
            except KeyboardInterrupt:  # from a caller's own handler (a sweep agent's, on SIGUSR2): stop alike
                stop.received.append(signal.SIGINT)
            self._record_exited()
            if stop.received:
                self._stop_all(stop)
                self.report.interrupted = True
            self._skip_unreachable(f"submit was interrupted by {stop.cause()}" if stop.received else "submit was interrupted")

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
                self.ex.echo(
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
            self.ex.echo(f"[{self.ended}/{self.total}] done    {job.label} ({seconds:.1f}s{attempts})")
            self._write(key, "succeeded", exit_code=0, attempt=attempt)
            return
        log = self.ex.paths.job(key).log
        self.report.failed[key] = log
        state: State = "timeout" if timed_out else "interrupted" if rc in (EXIT_INTERRUPTED, EXIT_ABORTED) else "failed"
        if timed_out:
            self.ex.echo(
                f"[{self.ended}/{self.total}] TIMEOUT  {job.label} (ran past its time_min of {self._minutes(key)} min, "
                f"exit {rc}{attempts}); log: {log}; to give it longer, raise executor.resources.{job.stage_id}.time_min"
            )
        else:
            self.ex.echo(f"[{self.ended}/{self.total}] {state.upper()}  {job.label} (exit {rc}{attempts}); log: {log}")
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
                self.ex.echo(f"skipped {self.plan.by_key[dep].label}: upstream {failed} failed")

    def _skip_unreachable(self, message: str) -> None:
        for key in self.waiting:
            self.report.cancelled.append(key)
            self._write(key, "cancelled", message=message)
        self.waiting.clear()

    def _stop_all(self, stop: _StopSignals) -> None:
        """SIGTERM to every running job (so stages can checkpoint), ``grace_s`` for them to end (a
        second signal cuts it short), SIGKILL for what is left; record them as cancelled."""
        cause, jobs = stop.cause(), list(self.running.items())
        self.ex.echo(
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
                self.ex.echo(f"{signal.Signals(stop.received[-1]).name} received as well: killing the {len(left)} jobs left now")
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
                self.ex.echo(
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
