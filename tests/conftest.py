"""Shared test setup: no network, the toy stage package importable in subprocesses too."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m orchestrator ARGS`` as a real process in ``cwd`` (``env`` added to ours)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def ended_within(pids: Iterable[int], timeout_s: float) -> bool:
    """Whether every one of ``pids`` has ended (gone, or a zombie) within ``timeout_s``."""
    from orchestrator.procutil import alive

    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids`` that is still there (a test's cleanup)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _importable_toystages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Job processes started by executors must import the toy stages and the package."""
    parts = [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in parts if p))
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


TOY_SPEC = """\
name: toy
languages: [en, de, fr]
stages:
  emit:
    matrix:
      language: ${languages}
    params:
      value: 3
  scale:
    matrix:
      language: ${languages}
    inputs:
      number: emit
  total:
    inputs:
      numbers: scale
stage_package: toystages
"""


@pytest.fixture
def toy_spec(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_SPEC)
    return path


@pytest.fixture
def wandb_study(toy_spec: Path, tmp_path: Path) -> tuple[Any, Any]:
    """The toy study tracked with W&B (project "test"), planned and its plan written under
    ``tmp_path/root``, nothing run: (plan, study paths)."""
    from orchestrator.paths import StudyPaths
    from orchestrator.plan import build_plan
    from orchestrator.records import write_plan
    from orchestrator.spec import load_study

    s, registry = load_study(toy_spec, ["tracking.backend=wandb", "tracking.project=test"])
    plan = build_plan(s, registry)
    paths = StudyPaths(tmp_path / "root", "toy")
    write_plan(paths, plan, toy_spec)
    return plan, paths
