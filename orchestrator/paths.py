"""Every file name the engine uses for a study's records, in one place."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

STORE_ENV = "ORCHESTRATOR_STORE"  # the storage root where neither --store nor storage.root names one
DEFAULT_STORE = ".orchestrator"


def default_root() -> Path:
    """The storage root where nothing names one: ``$ORCHESTRATOR_STORE``, else ``.orchestrator``
    (relative to the current directory)."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


@dataclass(frozen=True)
class JobPaths:
    """One job's files: its record (what to run), state, log, metrics and checkpoint folder."""

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
    """Where a study's records live under a storage root: its plan, its jobs' records, states and
    logs, the run locks and staging folders shared by every study of the root."""

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


def storage_root_problem(root: Path) -> str | None:
    """Why ``root`` cannot be (or become) the storage directory, or None; looks, creates nothing."""
    text = str(root)
    if "\0" in text:
        return "contains a NUL byte; give the path of a directory (created if missing)"
    path = Path(os.path.abspath(text))
    for probe in (path, *path.parents):
        try:
            mode = os.stat(probe).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there (yet), or under something that is not a directory: look further up
        except OSError as e:
            return f"{text} cannot be used: {e.strerror or e}; give the path of a directory you can write"
        if stat.S_ISDIR(mode):
            return None
        if probe == path:
            return f"{text} is a file, not a directory; give the path of a directory (created if missing)"
        return f"{probe} is not a directory, so {text} cannot be created; give the path of a directory"
    return None
