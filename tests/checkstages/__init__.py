"""Stages with a ``check`` hook, for tests/test_checks.py (not part of the package).

``emit``'s check knows the languages ``en``, ``de`` and ``fr``: another language is a problem of its
``language`` parameter, ``value`` 13 a problem of no parameter in particular, and language ``boom``
makes the check raise (a bug in the stage). Each call appends the params to ``CALLS`` and, when
``$CHECKSTAGES_LOG`` names a file, a line to it, so that tests count how often checks run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from orchestrator.stage import Registry, StageParams, stage

KNOWN = ("en", "de", "fr")
CALLS: list[dict[str, Any]] = []


class EmitParams(StageParams):
    language: str = "en"
    value: float = 1.0


def check_emit(params: EmitParams) -> list[str]:
    """Problems of a job with ``params``, found without running it."""
    CALLS.append(params.model_dump())
    log = os.environ.get("CHECKSTAGES_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(params.model_dump(), sort_keys=True) + "\n")
    if params.language == "boom":
        raise RuntimeError("the language table is broken\nsecond line")
    problems = []
    if params.language not in KNOWN:
        problems.append(f"language: the toy source has no {params.language!r}; it has: {', '.join(KNOWN)}")
    if params.value == 13:
        problems.append("the toy source refuses value 13 with any language")
    return problems


@stage("emit", params=EmitParams, outputs={"number": "number"}, check=check_emit)
def emit(params: EmitParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Write params.value."""
    out = ctx.output_dir("number")
    (out / "value.json").write_text(json.dumps({"value": params.value}))
    return {"number": {"value": params.value}}


def registry() -> Registry:
    """The stages of this package."""
    return Registry([emit])
