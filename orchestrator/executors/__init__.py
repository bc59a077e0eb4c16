"""Executors run a plan's jobs: one module per backend, all behind ``Executor``.

Backends are imported when first named (``orchestrator.executors.LocalExecutor``), so that a
command using one does not pay for importing the others.
"""

from __future__ import annotations

from typing import Any

from orchestrator.executors.base import Executor, StatusView, SubmitReport

__all__ = ["Executor", "StatusView", "SubmitReport", "LocalExecutor"]


def __getattr__(name: str) -> Any:
    if name == "LocalExecutor":
        from orchestrator.executors.local import LocalExecutor

        return LocalExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
