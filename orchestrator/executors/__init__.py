"""Executors run a plan's jobs: one module per backend, all behind ``Executor``."""

from __future__ import annotations

from orchestrator.executors.base import Executor, SubmitReport
from orchestrator.executors.local import LocalExecutor

__all__ = ["Executor", "SubmitReport", "LocalExecutor"]
