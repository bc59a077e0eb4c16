"""A stage that reports progress, for tests of ``ctx.progress`` (not part of the package).

``steps`` counts from 0 to ``steps``, calling ``ctx.progress(i, steps, unit)`` at each count and
sleeping ``sleep_s`` in between; at count ``hold_at`` it waits while the file ``hold_while``
exists (so a test sees it running). Ranks other than 0 report in a unit of their own
(``rank1``, ...), which must never reach the job's log or progress file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from orchestrator.stage import Registry, StageParams, stage


class StepsParams(StageParams):
    steps: int = 10
    sleep_s: float = 0.15
    hold_at: int = -1  # at this count, wait while hold_while exists
    hold_while: str = ""
    unit: str = "step"
    language: str = "en"


@stage("steps", params=StepsParams, outputs={"number": "number"})
def steps(params: StepsParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Count to params.steps, reporting each count."""
    unit = params.unit if ctx.rank == 0 else f"rank{ctx.rank}"
    for i in range(params.steps + 1):
        ctx.progress(i, params.steps, unit)
        while i == params.hold_at and params.hold_while and os.path.exists(params.hold_while):
            time.sleep(0.05)
        if i < params.steps:
            time.sleep(params.sleep_s)
    if ctx.rank == 0:
        (ctx.output_dir("number") / "value.json").write_text(json.dumps({"value": params.steps}))
    return {"number": {"value": params.steps}}


def registry() -> Registry:
    return Registry([steps])
