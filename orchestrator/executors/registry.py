"""Executor backends by name: the one place that maps ``executor.backend`` to code.

A backend is an ``Executor`` subclass in a module of its own; adding one is that module plus one
line here (or a ``register`` call, for a backend outside this package). Modules are imported when
a backend is first asked for, so a command pays only for the backends it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.executors.base import Executor

BACKENDS: dict[str, str] = {
    "local": "orchestrator.executors.local:LocalExecutor",
    "slurm": "orchestrator.executors.slurm:SlurmExecutor",
}


def names() -> list[str]:
    return list(BACKENDS)


def register(name: str, target: str) -> None:
    """Make ``executor.backend: <name>`` run ``target`` (``"package.module:ExecutorClass"``)."""
    BACKENDS[name] = target


def backend(name: str) -> type[Executor]:
    """The executor class of backend ``name``; ValueError naming the valid ones for another."""
    if name not in BACKENDS:
        raise ValueError(f"no executor backend {name!r}; valid: {', '.join(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    cls: type[Executor] = getattr(importlib.import_module(module), attr)
    return cls
