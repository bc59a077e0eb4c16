"""Shared test setup: no network, the toy stage package importable in subprocesses too."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


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
