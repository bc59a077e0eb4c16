"""Run a plan on this machine: one process per job, bounded parallelism, one log file per job.

Job processes are forked from a pre-started server that has already imported the runner (the
``forkserver`` start method), so a job pays for its own stage's imports but not for starting Python
and importing the engine again (~0.2 s a job otherwise). Each job runs exactly what
``python -m orchestrator run-job JOB.json`` runs, in its own session (process group), with stdout and
stderr in its log file.

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
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

from orchestrator.artifacts import ArtifactStore
from orchestrator.executors.base import Executor, SubmitReport
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.records import write_state
from orchestrator.runner import EXIT_INTERRUPTED

POLL_S = 0.5  # upper bound on a wait: job exits wake the loop at once


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
        job_paths = self.paths.job(key)
        argv = ["run-job", str(job_paths.record), *(["--force"] if force else [])]
        environ = dict(os.environ)
        environ.setdefault("OMP_NUM_THREADS", str(cpus))  # the job's share, as SLURM's cpus-per-task would give
        proc = _context().Process(target=_job_main, args=(argv, str(job_paths.log), environ, os.getcwd()), name=f"job-{key[:12]}")
        proc.start()
        write_state(self.paths, key, "running", executor=self.name, external_id=str(proc.pid))
        return proc


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. inside a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _context() -> multiprocessing.context.BaseContext:
    """Fork jobs from a server that imported the runner once (plain fork where there is none)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["orchestrator.cli", "orchestrator.runner"])
    return ctx


def _job_main(argv: list[str], log_path: str, environ: dict[str, str], cwd: str) -> None:
    """A job process: its own session (so signals reach the whole job), output to its log, then
    the same code path as ``python -m orchestrator run-job``. The server was forked earlier, so the
    submitter's current environment and directory are applied here."""
    os.setsid()
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from orchestrator.cli import main

    # SystemExit is how a multiprocessing target sets its exit code while still running the
    # process's finalizers (which release e.g. tqdm's semaphores instead of leaking them)
    sys.exit(main(argv))


class _Run:
    """The scheduling loop of one submit."""

    def __init__(
        self, executor: LocalExecutor, plan: Plan, todo: list[str], cached: set[str], force: bool, report: SubmitReport
    ) -> None:
        self.ex, self.plan, self.force, self.report = executor, plan, force, report
        self.waiting = list(todo)
        self.done = set(cached)
        self.running: dict[str, tuple[BaseProcess, float]] = {}
        self.total = len(todo)
        resources = plan.study.executor
        self.cpus = {key: min(resources.resources_for(plan.by_key[key].stage_id).cpus, executor.cpus) for key in todo}

    def loop(self) -> None:
        try:
            while self.waiting or self.running:
                self._start_ready()
                if not self.running:
                    break
                multiprocessing.connection.wait([p.sentinel for p, _ in self.running.values()], timeout=POLL_S)
                self._reap()
        except KeyboardInterrupt:
            self._stop_all()
            self.report.interrupted = True
        self._skip_unreachable()

    def _start_ready(self) -> None:
        """Start ready jobs, in plan order, while slots and CPUs (each job's resources.cpus) allow."""
        for key in list(self.waiting):
            if len(self.running) >= self.ex.max_parallel:
                return
            in_use = sum(self.cpus[k] for k in self.running)
            fits = not self.running or in_use + self.cpus[key] <= self.ex.cpus
            if fits and all(d in self.done for d in self.plan.by_key[key].deps):
                self.waiting.remove(key)
                self.running[key] = (self.ex._launch(key, self.force, self.cpus[key]), time.monotonic())

    def _reap(self) -> None:
        for key, (proc, started) in list(self.running.items()):
            rc = proc.exitcode
            if rc is None:
                continue
            proc.close()
            del self.running[key]
            self._finished(key, rc if rc >= 0 else 128 - rc, time.monotonic() - started)

    def _finished(self, key: str, rc: int, seconds: float) -> None:
        label = self.plan.by_key[key].label
        n = self.total - len(self.waiting) - len(self.running)
        if rc == 0:
            self.done.add(key)
            self.report.succeeded.append(key)
            write_state(self.ex.paths, key, "succeeded", exit_code=0, executor=self.ex.name)
            self.ex.echo(f"[{n}/{self.total}] done    {label} ({seconds:.1f}s)")
            return
        log = self.ex.paths.job(key).log
        state = "interrupted" if rc == EXIT_INTERRUPTED else "failed"
        write_state(self.ex.paths, key, state, exit_code=rc, executor=self.ex.name)
        self.report.failed[key] = log
        self.ex.echo(f"[{n}/{self.total}] {state.upper()}  {label} (exit {rc}); log: {log}")
        self._skip_dependents(key)

    def _skip_dependents(self, key: str) -> None:
        for dep in self.plan.downstream({key}):
            if dep in self.waiting:
                self.waiting.remove(dep)
                self.report.skipped.append(dep)
                failed = self.plan.by_key[key].label
                write_state(self.ex.paths, dep, "skipped", executor=self.ex.name, message=f"upstream {failed} failed")
                self.ex.echo(f"skipped {self.plan.by_key[dep].label}: upstream {failed} failed")

    def _skip_unreachable(self) -> None:
        for key in self.waiting:
            self.report.cancelled.append(key)
            write_state(self.ex.paths, key, "cancelled", executor=self.ex.name, message="submit was interrupted")
        self.waiting = []

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
