"""Benchmark-only stages (not part of the package): trivially cheap, so the engine's own cost shows.

``prep`` writes one small file per language, ``point`` reads one ``prep`` output (a languages x
thresholds x seeds matrix), ``gather`` reads every ``point`` output. Nothing heavy is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.stage import Input, Registry, StageParams, stage


class PrepParams(StageParams):
    language: str = "en"


class PointParams(StageParams):
    language: str = "en"
    threshold: float = 1.0


class GatherParams(StageParams):
    label: str = "all"


@stage("prep", params=PrepParams, outputs={"data": "data"})
def prep(params: PrepParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Write the language name."""
    (ctx.output_dir("data") / "data.txt").write_text(params.language)
    return {}


@stage("point", params=PointParams, inputs={"data": Input("data")}, outputs={"result": "result"})
def point(params: PointParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Write one line naming the point."""
    text = (inputs["data"].path / "data.txt").read_text()
    (ctx.output_dir("result") / "result.txt").write_text(f"{text} {params.threshold} {ctx.seed}\n")
    return {}


@stage("gather", params=GatherParams, inputs={"results": Input("result", many=True)}, outputs={"summary": "summary"})
def gather(params: GatherParams, inputs: Any, ctx: Any) -> Mapping[str, Mapping[str, Any]]:
    """Concatenate every point's line."""
    lines = [(i.path / "result.txt").read_text() for i in inputs["results"]]
    (ctx.output_dir("summary") / "summary.txt").write_text("".join(lines))
    return {}


def registry() -> Registry:
    return Registry([prep, point, gather])
