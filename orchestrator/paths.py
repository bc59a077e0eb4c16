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
        """The job's staging folder, on the store's filesystem: one subfolder per attempt holds
        that attempt's outputs until they are committed (see ``attempt``)."""
        return self.root / "staging" / key

    def attempt(self, key: str, token: str) -> Path:
        """Scratch space for one attempt's outputs: no two runs of a key ever share one."""
        return self.staging(key) / token

    def run_lock(self, key: str) -> Path:
        """The lock file held by whoever runs job ``key``, from the start of a run to its commit;
        under the storage root, so every study, executor and node sharing the store sees it."""
        return run_lock_path(self.root, key)


def run_lock_path(root: Path, key: str) -> Path:
    """See ``StudyPaths.run_lock``: the same file for every study under ``root``."""
    return root / "locks" / f"{key}.lock"
