"""Tracking backends: where a job's metrics go. ``open_run`` picks the one the spec names."""

from __future__ import annotations

import sys

from orchestrator.errors import OrchestratorError
from orchestrator.paths import StudyPaths
from orchestrator.records import JobRecord
from orchestrator.tracking.base import TrackingRun
from orchestrator.tracking.local import LocalRun

__all__ = ["TrackingRun", "LocalRun", "end_services", "open_run"]


def open_run(record: JobRecord, paths: StudyPaths) -> TrackingRun:
    """Open the tracking run of one job; a backend that cannot run here is an error, never a fallback."""
    if record.tracking.backend == "local":
        return LocalRun(paths.job(record.key).metrics)
    if record.tracking.backend == "wandb":
        from orchestrator.tracking.wandb import WandbRun  # imports wandb itself only when used

        return WandbRun(record, paths)
    raise OrchestratorError(
        f"tracking backend {record.tracking.backend!r} is not available in this version; "
        "use tracking.backend=local (--set tracking.backend=local)"
    )


def end_services() -> None:
    """End what tracking backends left running in this process's background (wandb's service),
    each within a bounded time, so that no command hangs at exit on one after it has finished its
    work (``wandb_files.end_service``); nothing where no backend started anything."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        from orchestrator.tracking.wandb_files import end_service

        end_service(wandb)
