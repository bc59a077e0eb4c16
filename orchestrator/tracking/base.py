"""The interface every tracking backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping


class TrackingRun(ABC):
    """One job's run in the tracking backend."""

    @abstractmethod
    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics, optionally at a step."""

    @abstractmethod
    def finish(self, ok: bool) -> None:
        """Close the run, marking it succeeded or failed."""
