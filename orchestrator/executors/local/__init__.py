"""Run a plan on this machine: one process per job, bounded parallelism, one log file per job.

Job processes are forked from a pre-started server that has already imported the runner (the
``forkserver`` start method), so a job pays for its own stage's imports but not for starting Python
and importing the engine again (~0.2 s a job otherwise). Each job runs what ``python -m orchestrator
run-job JOB.json`` runs (``runner.run_job_command``), in its own session (process group), with stdout
and stderr in its log file. The submitting process computes the code half of provenance (git
commit and package versions: two git subprocesses, ~10 ms) about once a second and hands it to
the jobs it starts, which would otherwise each compute it again.

A failed job stops its dependents (independent jobs go on). A job that runs longer than its
``resources.time_min`` is stopped like an interrupted one (SIGTERM to its process group, so a
stage can checkpoint, then SIGKILL after ``grace_s``) and recorded as ``timeout``, a failure.
A job's ``resources.retries`` are run by the runner inside the job's process, so one progress
line and one time limit cover all of its attempts; the last attempt's number is carried into
the job's final state.

While jobs run, the submit shows the study's progress and each running job's (``live.py``): a
block redrawn in place on a terminal, a plain status line every 30 s elsewhere, nothing under -q.

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
since no one else will. If the jobs die with it (the OOM killer, a lost node), nobody records
their ends: ``status`` then shows the jobs that never started as cancelled and those whose process
has gone as failed, told by a lock that each submit holds while it runs (``liveness.py``).

A state file that cannot be written (a full disk) does not stop the loop: it says so once and
goes on reaping and stopping jobs, rewriting such a state in place or removing it rather than
leaving it stale (a job the disk stopped is just a failed job).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactStore
from orchestrator.executors.base import Executor, StatusView, SubmitReport
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.provenance import code_provenance
from orchestrator.records import JobState
from orchestrator.spec import Study

from .job import _context, _job_main, _JobStart, available_cpus
from .job import _watch_submitter as _watch_submitter  # (tests reach it here)
from .live import LiveView
from .liveness import orphaned_rows, submitting
from .loop import SUBMIT_STOP_SIGNALS as SUBMIT_STOP_SIGNALS  # (tests reach these here)
from .loop import _Run
from .loop import _StopSignals as _StopSignals

CODE_PROVENANCE_MAX_AGE_S = 1.0  # how stale the git/packages snapshot handed to a job may be


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


class LocalExecutor(Executor):
    """Runs a plan on this machine: one process per job, at most ``max_parallel`` at once and
    within the CPUs each job asks for, until every job has ended; see the package docstring."""

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

    @classmethod
    def from_study(cls, study: Study, paths: StudyPaths, store: ArtifactStore, *, dry_run: bool = False) -> LocalExecutor:
        return cls(paths, store, max_parallel=study.executor.local.max_parallel)

    @classmethod
    def status(cls, paths: StudyPaths, states: Mapping[str, JobState | None]) -> StatusView:
        """The jobs of local submits that died without recording their ends (``liveness``)."""
        return StatusView(orphaned_rows(paths, states, cls.name))

    def submit(self, plan: Plan, spec_path: Path, *, force: bool = False) -> SubmitReport:
        with submitting(self.paths):
            return self._submit(plan, spec_path, force)

    def _submit(self, plan: Plan, spec_path: Path, force: bool) -> SubmitReport:
        view = LiveView.for_submit(self.paths, plan, self.max_parallel, self.echo)  # (checks its setting first)
        todo, cached = self.prepare(plan, spec_path, force)
        report = SubmitReport(cached=sorted(cached))
        if cached:
            view.note(f"{len(cached)} of {len(plan.jobs)} jobs cached (outputs already committed)")
        if not todo:
            self.echo("nothing to run")
            return report
        view.note(
            f"running {len(todo)} jobs, at most {self.max_parallel} at a time on {self.cpus} CPUs; "
            f"logs under {self.paths.dir / 'jobs'}"
        )
        _Run(self, plan, todo, cached, force, report, view).loop()
        return report

    def _launch(self, key: str, force: bool, cpus: int) -> BaseProcess:
        environ = dict(os.environ)
        environ.setdefault("OMP_NUM_THREADS", str(cpus))  # the job's share, as SLURM's cpus-per-task would give
        job = _JobStart(self.paths, key, force, environ, os.getcwd(), self._code.get(), os.getpid())
        proc = _context().Process(target=_job_main, args=(job,), name=f"job-{key[:12]}")
        proc.start()
        return proc
