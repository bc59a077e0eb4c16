"""The report's inputs: each artifact's JSON read once into a :class:`ReportInputs` (:func:`load_report_inputs`).

Every input of the report is optional. A connected single-artifact input must hold its one JSON file
(:data:`FILES`, named by :mod:`stages.formats.metrics`; a missing file is a mis-wired input, an error); the
head masks are read by :mod:`stages.formats.masks`. The study's order of languages is that of the first
input that lists them (:data:`ORDER_SOURCES`). What the report reads of each file, and how it treats a key
written by an older version of its stage, is :mod:`stages.report_reading`'s.

Nothing here imports numpy or a plotting library at import time (the engine imports the stage
module, and with it this one, to plan studies).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.stage import Inputs, ResolvedInput
from stages._io import optional_input, read_json
from stages.formats.masks import mask_language, read_mask_dir, read_trajectory
from stages.formats.metrics import (
    CROSS_EVAL_JSON,
    LANGUAGE_DISTANCE_JSON,
    MASK_STATS_JSON,
    MODEL_METRICS_JSON,
    SIMILARITY_JSON,
    TOKEN_OVERLAP_JSON,
)
from stages.formats.names import FULL

# the one JSON file each single-artifact input must hold
FILES: dict[str, str] = {
    "model": MODEL_METRICS_JSON,
    "cross_eval": CROSS_EVAL_JSON,
    "mask_stats": MASK_STATS_JSON,
    "similarity": SIMILARITY_JSON,
    "token_overlap": TOKEN_OVERLAP_JSON,
    "language_distance": LANGUAGE_DISTANCE_JSON,
}
# the inputs in the order the page lists them
INPUT_ORDER = ("model", "masks", "cross_eval", "mask_stats", "similarity", "token_overlap", "language_distance")
# where the study's order of languages is read from, first found first
ORDER_SOURCES = ("model", "similarity", "token_overlap", "language_distance", "cross_eval", "mask_stats")


class ReportChoice(Protocol):
    """What the figure plan and the text read of the report's parameters (:class:`stages.report.ReportParams`
    has both): the similarity measure, and the layer (None: the mean over layers)."""

    @property
    def measure(self) -> str: ...

    @property
    def layer(self) -> int | None: ...


@dataclass
class MaskData:
    """One language's head-mask artifact as the report needs it."""

    language: str
    info: dict[str, Any]
    trajectory: list[dict[str, Any]] | None
    heads_kept: int
    total_heads: int
    source: ResolvedInput


@dataclass
class ReportInputs:
    """Every input that is present: the resolved artifact versions and their parsed JSON, and the
    provenance the engine passed (empty from an older engine)."""

    sources: dict[str, list[ResolvedInput]] = field(default_factory=dict)
    docs: dict[str, Any] = field(default_factory=dict)
    masks: list[MaskData] = field(default_factory=list)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return bool(self.sources.get(name))

    def languages(self) -> list[str]:
        """Every language any input mentions, in the study's order: that of the first input (in
        :data:`ORDER_SOURCES` order) that lists it."""
        seen: list[str] = []
        for name in ORDER_SOURCES:
            doc = self.docs.get(name) or {}
            seen += list(doc.get("languages") or doc.get("cols") or [])
        seen += [m.language for m in self.masks]
        return [x for x in dict.fromkeys(seen) if x != FULL]


def load_report_inputs(inputs: Inputs, provenance: Mapping[str, Any] | None = None) -> ReportInputs:
    """Read every present input (a missing file in a present input is an error: a mis-wired input)."""
    study = ReportInputs(provenance=dict(provenance or {}))
    for name, file in FILES.items():
        item = optional_input(inputs, name)
        if item is None:
            continue
        path = Path(item.path) / file
        if not path.is_file():
            raise ValueError(f"input {name!r} ({item.ref}) has no {file}: connect it to the output of the "
                             f"stage that writes {file}")
        study.sources[name] = [item]
        study.docs[name] = read_json(path)
    masks = inputs.get("masks")
    items = [masks] if isinstance(masks, ResolvedInput) else list(masks or [])
    study.masks = [read_mask(item) for item in items]
    if study.masks:
        study.sources["masks"] = items
    langs = [m.language for m in study.masks]
    if len(set(langs)) != len(langs):
        raise ValueError(f"two head masks for the same language: {langs}")
    return study


def read_mask(item: ResolvedInput) -> MaskData:
    """Language, mask.json, trajectory and head counts of one ``head-mask`` artifact."""
    mask, info = read_mask_dir(item.path)
    lang = mask_language(item, info)
    return MaskData(lang, info, read_trajectory(item.path), int((mask > 0.5).sum()), int(mask.size), item)
