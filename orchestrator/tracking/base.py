"""The interface every tracking backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

from orchestrator.artifacts import ArtifactVersion


class TrackingRun(ABC):
    """One job's run in the tracking backend."""

    # whether ``log_output`` reads the files: the runner materialises an output (a verified copy
    # of every file) only for a backend that mirrors them
    mirrors_files: bool = False

    @abstractmethod
    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics, optionally at a step."""

    def use_input(self, version: ArtifactVersion, path: Path) -> None:  # noqa: B027 - optional hook
        """Declare an input artifact version the job read (for the backend's lineage graph)."""

    def log_output(self, version: ArtifactVersion, path: Path) -> None:  # noqa: B027 - optional hook
        """Mirror an output version the store just committed (files under ``path``)."""

    @abstractmethod
    def finish(self, ok: bool) -> None:
        """Close the run, marking it succeeded or failed."""
