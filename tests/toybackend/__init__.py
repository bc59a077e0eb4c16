"""A third executor backend, in one file, for the test that adding one touches nothing else:
``inline`` runs a plan's jobs one after another in the submitting process (no scheduler, no
parallelism). Registered by the test with ``orchestrator.executors.registry.register``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from orchestrator.artifacts import ArtifactStore
from orchestrator.executors import Executor, StatusView, SubmitReport
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.records import JobState, write_state
from orchestrator.runner import EXIT_OK, run_job
from orchestrator.spec import Study


class InlineExecutor(Executor):
    name = "inline"

    @classmethod
    def from_study(cls, study: Study, paths: StudyPaths, store: ArtifactStore, *, dry_run: bool = False) -> InlineExecutor:
        return cls(paths, store)

    @classmethod
    def status(cls, paths: StudyPaths, states: Mapping[str, JobState | None]) -> StatusView:
        mine = {key: s for key, s in states.items() if s and s.executor == cls.name}
        return StatusView({key: (s.state, "inline, in the submitting process") for key, s in mine.items()})

    def submit(self, plan: Plan, spec_path: Path, *, force: bool = False) -> SubmitReport:
        todo, cached = self.prepare(plan, spec_path, force)
        report = SubmitReport(cached=sorted(cached))
        broken: set[str] = set()
        for key in todo:
            if broken & set(plan.by_key[key].deps):
                broken.add(key)
                report.skipped.append(key)
                write_state(self.paths, key, "skipped", executor=self.name)
                continue
            write_state(self.paths, key, "running", executor=self.name)
            ok = run_job(self.paths.job(key).record, force) == EXIT_OK
            write_state(self.paths, key, "succeeded" if ok else "failed", executor=self.name)
            if ok:
                report.succeeded.append(key)
            else:
                broken.add(key)
                report.failed[key] = self.paths.job(key).log
        return report
