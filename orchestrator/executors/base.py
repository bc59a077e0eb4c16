"""What every executor shares: the interface the CLI talks to, the cache check, job records, and
the submit report.

An executor backend answers four questions, so that nothing outside its module needs to know
which backend it is (``orchestrator.executors.registry`` maps names to classes):

- ``from_study``: an executor for a study's settings (``executor.<backend>``), ready to ``submit``;
- ``unavailable``: why it cannot run on this machine, before anything is written (None: it can);
- ``status``: what its scheduler says of a study's jobs, beyond the states they recorded;
- ``cancel``: stop what it still runs or has queued for a study.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from orchestrator.artifacts import ArtifactStore
from orchestrator.lineage import LineageCheck, went_stale
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.records import JobRecord, JobState, record_dict, write_job_record, write_plan, write_state
from orchestrator.spec import Study


@dataclass
class SubmitReport:
    """What a submit did, by job key."""

    cached: list[str] = field(default_factory=list)
    succeeded: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)  # queued elsewhere (SLURM), outcome unknown yet
    failed: dict[str, Path] = field(default_factory=dict)  # key -> log path
    skipped: list[str] = field(default_factory=list)  # an upstream job failed
    cancelled: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not (self.failed or self.skipped or self.cancelled or self.interrupted)


@dataclass
class StatusView:
    """A backend's word on some jobs, for ``status``: job key -> (state, where it runs), and a
    warning when its scheduler could not be asked."""

    rows: dict[str, tuple[str, str]] = field(default_factory=dict)
    warning: str | None = None

    def merge(self, other: StatusView) -> None:
        self.rows.update(other.rows)
        self.warning = "; ".join(w for w in (self.warning, other.warning) if w) or None


def run_reasons(plan: Plan, store: ArtifactStore, force: bool) -> dict[str, str]:
    """Job key -> why it must run, for every job of the plan whose committed result is not current
    (see ``orchestrator.lineage``); every job with ``force``."""
    return LineageCheck(store).plan_problems(plan.jobs, force)


def cached_keys(plan: Plan, store: ArtifactStore, force: bool) -> set[str]:
    """Jobs whose committed result is current: outputs in place, built from the input versions
    their upstream jobs record now (none with ``force``)."""
    reasons = run_reasons(plan, store, force)
    return {job.key for job in plan.jobs if job.key not in reasons}


def rerun_notes(plan: Plan, reasons: dict[str, str], limit: int = 10) -> list[str]:
    """One line per job that ran before but must run again, and why (first ``limit``)."""
    lines = [f"{plan.by_key[k].label}: {r}" for k, r in reasons.items() if went_stale(r)]
    more = [f"... and {len(lines) - limit} more"] if len(lines) > limit else []
    return [f"  rerun {line}" for line in lines[:limit]] + more


class Executor(ABC):
    """Runs (or queues) the jobs of a plan that are not cached."""

    name: ClassVar[str]
    label: ClassVar[str] = ""  # how messages name it ("SLURM"); default: its name
    writes_scripts: ClassVar[bool] = False  # a dry run shows the scripts it would submit (else: the plan)
    echo: Callable[[str], None] = print

    @classmethod
    @abstractmethod
    def from_study(cls, study: Study, paths: StudyPaths, store: ArtifactStore, *, dry_run: bool = False) -> Executor:
        """An executor with the study's settings for this backend."""

    @classmethod
    def spec_problems(cls, study: Study) -> list[tuple[tuple[str | int, ...], str]]:
        """What in the study's settings this backend cannot run: (field path, message) each."""
        return []

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run here (one line saying what to do instead), or None."""
        return None

    @classmethod
    def warnings(cls, plan: Plan) -> list[str]:
        """What in ``plan`` this backend will run but a user probably did not mean (one line each)."""
        return []

    @classmethod
    def status(cls, paths: StudyPaths, states: Mapping[str, JobState | None]) -> StatusView:
        """What this backend knows of the study's jobs beyond their recorded ``states`` (job key ->
        state, None where a job recorded none): none by default."""
        return StatusView()

    @classmethod
    def cancel(cls, paths: StudyPaths) -> list[str] | None:
        """Stop what this backend still runs or has queued for the study; return what was stopped,
        or None where it never ran any of the study's jobs."""
        return None

    def __init__(self, paths: StudyPaths, store: ArtifactStore) -> None:
        self.paths = paths
        self.store = store

    def prepare(self, plan: Plan, spec_path: Path, force: bool, *, job_files: bool = True) -> tuple[list[str], set[str]]:
        """Write the plan and every job record; return (keys to run in order, cached keys).

        Without ``job_files``, jobs to run get no record or state file here (the SLURM executor
        ships records inside its per-stage job lists), only any stale state from an earlier submit
        is removed, so that status reads the new submission instead.
        """
        self.write_plan(plan, spec_path)
        reasons = run_reasons(plan, self.store, force)
        for line in rerun_notes(plan, reasons):
            self.echo(line)
        cached = {job.key for job in plan.jobs if job.key not in reasons}
        spec_hash = plan.study.spec_hash()
        todo = []
        for job in plan.jobs:
            if job.key in cached:
                self.mark_cached(job.key)
            elif job_files:
                record = record_dict(job, plan, self.paths.root, spec_hash, spec_path)
                write_job_record(self.paths, JobRecord.model_validate(record))
                write_state(self.paths, job.key, "pending", executor=self.name)
            else:
                self.paths.job(job.key).state.unlink(missing_ok=True)
            if job.key not in cached:
                todo.append(job.key)
        return todo, cached

    def write_plan(self, plan: Plan, spec_path: Path) -> None:
        """Record the plan being submitted (replacing the study's previous one)."""
        write_plan(self.paths, plan, spec_path)

    def mark_cached(self, key: str) -> None:
        write_state(self.paths, key, "cached", executor=self.name)

    @abstractmethod
    def submit(self, plan: Plan, spec_path: Path, *, force: bool = False) -> SubmitReport:
        """Run or queue every job that is not cached, in dependency order."""
