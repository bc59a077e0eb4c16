"""Local tracking: metrics as JSON lines in the job's directory."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

from orchestrator.tracking.base import TrackingRun


class LocalRun(TrackingRun):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = {"time": round(time.time(), 3), "step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def finish(self, ok: bool) -> None:
        self._file.close()


def _clean(value: float) -> float | None:
    """JSON has no NaN or infinity: write them as null."""
    value = float(value)
    return value if math.isfinite(value) else None
