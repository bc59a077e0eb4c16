"""Run a plan on this machine: one process per job, bounded parallelism, one log file per job.

Job processes are forked from a pre-started server that has already imported the runner (the
``forkserver`` start method), so a job pays for its own stage's imports but not for starting Python
and importing the engine again (~0.2 s a job otherwise). Each job runs what ``python -m orchestrator
run-job JOB.json`` runs (``cli.run_job_command``), in its own session (process group), with stdout
and stderr in its log file. The submitting process computes the code half of provenance (git
commit and package versions: two git subprocesses, ~10 ms) about once a second and hands it to
the jobs it starts, which would otherwise each compute it again.

A failed job stops its dependents (independent jobs go on); Ctrl-C sends SIGTERM to every running
job (so stages can checkpoint), waits ``grace_s``, then kills what is left.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import sys
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
from orchestrator.records import State, write_state
from orchestrator.runner import EXIT_INTERRUPTED, code_provenance

POLL_S = 0.5  # upper bound on a wait: job exits wake the loop at once
CODE_PROVENANCE_MAX_AGE_S = 1.0  # how stale the git/packages snapshot handed to a job may be
FORKSERVER_PRELOAD = ("orchestrator.cli", "orchestrator.runner", "orchestrator.executors.local")  # see _context


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
    ) -> None:
        super().__init__(paths, store)
        self.max_parallel = max_parallel
        self.grace_s = grace_s
        self.echo = echo
        self.cpus = cpus or available_cpus()
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
        job = _JobStart(self.paths, key, force, environ, os.getcwd(), self._code.get())
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


def _job_main(job: _JobStart) -> None:
    """A job process: its own session (so signals reach the whole job), output to its log, then
    what ``python -m orchestrator run-job RECORD`` runs, with the submitter's code provenance."""
    os.setsid()
    os.environ.clear()
    os.environ.update(job.environ)
    os.chdir(job.cwd)
    job_paths = job.paths.job(job.key)
    fd = os.open(job_paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from orchestrator.cli import run_job_command

    # SystemExit is how a multiprocessing target sets its exit code while still running the
    # process's finalizers (which release e.g. tqdm's semaphores instead of leaking them)
    sys.exit(run_job_command(job_paths.record, force=job.force, code=job.code))


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
        self.running: dict[str, tuple[BaseProcess, float]] = {}
        self.exited: list[tuple[str, int, float]] = []  # reaped, state not written yet: (key, rc, seconds)
        self.total, self.ended = len(todo), 0
        resources = plan.study.executor
        self.cpus = {key: min(resources.resources_for(plan.by_key[key].stage_id).cpus, executor.cpus) for key in todo}
        self.order = {key: i for i, key in enumerate(todo)}
        self.unmet: dict[str, int] = {}  # waiting job -> how many of its dependencies have not succeeded
        self.dependents: dict[str, list[str]] = {}  # job -> the waiting jobs that depend on it
        for key in todo:
            self._index(key, cached)
        self.ready = [key for key in todo if not self.unmet[key]]

    def _index(self, key: str, cached: set[str]) -> None:
        deps = [d for d in self.plan.by_key[key].deps if d not in cached]
        self.unmet[key] = len(deps)
        for dep in deps:
            self.dependents.setdefault(dep, []).append(key)

    def loop(self) -> None:
        try:
            self._start_ready()
            while self.running:
                multiprocessing.connection.wait([p.sentinel for p, _ in self.running.values()], timeout=POLL_S)
                self._reap()
                self._start_ready()  # refill the slots first: a state write can take milliseconds
                self._record_exited()
        except KeyboardInterrupt:
            self._record_exited()
            self._stop_all()
            self.report.interrupted = True
        self._skip_unreachable()

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
            proc = self.ex._launch(key, self.force, self.cpus[key])
            self.running[key] = (proc, time.monotonic())  # from here on, Ctrl-C stops it
            write_state(self.ex.paths, key, "running", executor=self.ex.name, external_id=str(proc.pid))

    def _reap(self) -> None:
        """Move exited jobs from ``running`` to ``exited``; a success makes its dependents ready."""
        for key, (proc, started) in list(self.running.items()):
            rc = proc.exitcode
            if rc is None:
                continue
            proc.close()
            del self.running[key]
            if rc == 0:
                self._release_dependents(key)
            self.exited.append((key, rc if rc >= 0 else 128 - rc, time.monotonic() - started))

    def _release_dependents(self, key: str) -> None:
        for dep in self.dependents.pop(key, ()):
            self.unmet[dep] -= 1
            if not self.unmet[dep] and dep in self.waiting:
                insort(self.ready, dep, key=self.order.__getitem__)

    def _record_exited(self) -> None:
        while self.exited:
            self._finished(*self.exited.pop(0))

    def _finished(self, key: str, rc: int, seconds: float) -> None:
        label = self.plan.by_key[key].label
        self.ended += 1
        if rc == 0:
            self.report.succeeded.append(key)
            write_state(self.ex.paths, key, "succeeded", exit_code=0, executor=self.ex.name)
            self.ex.echo(f"[{self.ended}/{self.total}] done    {label} ({seconds:.1f}s)")
            return
        log = self.ex.paths.job(key).log
        state: State = "interrupted" if rc == EXIT_INTERRUPTED else "failed"
        write_state(self.ex.paths, key, state, exit_code=rc, executor=self.ex.name)
        self.report.failed[key] = log
        self.ex.echo(f"[{self.ended}/{self.total}] {state.upper()}  {label} (exit {rc}); log: {log}")
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
                write_state(self.ex.paths, dep, "skipped", executor=self.ex.name, message=f"upstream {failed} failed")
                self.ex.echo(f"skipped {self.plan.by_key[dep].label}: upstream {failed} failed")

    def _skip_unreachable(self) -> None:
        for key in self.waiting:
            self.report.cancelled.append(key)
            write_state(self.ex.paths, key, "cancelled", executor=self.ex.name, message="submit was interrupted")
        self.waiting.clear()

    def _stop_all(self) -> None:
        self.ex.echo(
            f"interrupted: stopping {len(self.running)} running jobs (SIGTERM, then SIGKILL after {self.ex.grace_s:.0f}s)"
        )
        for proc, _ in self.running.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.ex.grace_s
        for key, (proc, _) in self.running.items():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                _signal_group(proc, signal.SIGKILL)
                proc.join()
            self.report.cancelled.append(key)
            write_state(
                self.ex.paths, key, "cancelled", exit_code=proc.exitcode, executor=self.ex.name, message="stopped by Ctrl-C"
            )
        self.running.clear()


def _signal_group(proc: BaseProcess, sig: signal.Signals) -> None:
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
