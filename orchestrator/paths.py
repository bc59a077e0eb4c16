"""Every file name the engine uses for a study's records, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class JobPaths:
    dir: Path

    @property
    def record(self) -> Path:
        """What the runner needs to run the job (written by the executor)."""
        return self.dir / "job.json"

    @property
    def log(self) -> Path:
        return self.dir / "job.log"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint"


@dataclass(frozen=True)
class StudyPaths:
    root: Path
    study: str

    @property
    def store(self) -> Path:
        return self.root / "artifacts"

    @property
    def dir(self) -> Path:
        return self.root / "studies" / self.study

    @property
    def plan(self) -> Path:
        return self.dir / "plan.json"

    def job(self, key: str) -> JobPaths:
        return JobPaths(self.dir / "jobs" / key)

    def staging(self, key: str) -> Path:
        """Scratch space for a running job's outputs, on the store's filesystem."""
        return self.root / "staging" / key
