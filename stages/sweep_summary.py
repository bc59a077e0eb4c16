"""Stage ``sweep_summary``: how subnetworks change along a swept parameter (e.g. the pruning threshold).

It gathers (``collect``) every sweep point's head masks, and where present the cross-evaluations,
mask statistics and similarities, and reports per point and language: heads kept, the subnetwork's
perplexity on its own language relative to the full model, the mean Jaccard of kept heads between
languages, and the mean over layers of the reference-vs-language CKA through the subnetworks.
Output ``figures``: ``summary.csv``/``summary.json``/``summary.md`` and one PNG+PDF per quantity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from orchestrator.stage import Input, Inputs, ResolvedInput, StageContext, StageDef, StageParams, stage
from stages._io import write_json
from stages.formats.masks import read_mask_info
from stages.formats.metrics import CROSS_EVAL_JSON, MASK_STATS_JSON, SIMILARITY_JSON, read_table
from stages.formats.names import FULL, SUBNETWORK, Measure

QUANTITIES = {
    "heads_kept": "heads kept",
    "own_relative_perplexity": "own-language perplexity / full model's",
    "mean_jaccard": "mean Jaccard of kept heads (all language pairs)",
    "mean_cka": "mean similarity (the summary's measure) over layers, reference vs language (subnetworks)",
}


class SweepSummaryParams(StageParams):
    axis: str = Field("threshold", description="the sweep axis to summarise along (a matrix axis of the inputs)")
    reference: str = Field("en", description="reference language of the CKA column")
    measure: Measure = Field(
        "cka_debiased", description="similarity measure averaged over layers (debiased CKA: near 0 for unrelated representations)"
    )


def _items(inputs: Inputs, name: str) -> list[ResolvedInput]:
    value = inputs.get(name)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _axis_value(item: ResolvedInput, axis: str) -> Any:
    if axis not in item.point:
        raise ValueError(
            f"input {item.ref} has no sweep axis {axis!r} in its matrix point {dict(item.point)}; "
            f"set params.axis to one of {sorted(item.point)} and collect that axis in the spec"
        )
    return item.point[axis]


def summary_rows(inputs: Inputs, params: SweepSummaryParams) -> list[dict[str, Any]]:
    """One row per (sweep value, language), from every available input."""
    rows: dict[tuple[Any, str], dict[str, Any]] = {}
    for item in _items(inputs, "masks"):
        mask = read_mask_info(item.path)
        lang = item.point.get("language", mask.get("language"))
        value = _axis_value(item, params.axis)
        rows[(value, lang)] = {
            params.axis: value,
            "language": lang,
            "heads_kept": mask.get("heads_kept"),
            "total_heads": mask.get("total_heads"),
        }
    per_value: dict[Any, dict[str, Any]] = {}
    for item in _items(inputs, "cross_eval"):
        per_value.setdefault(_axis_value(item, params.axis), {})["cross_eval"] = read_table(item.path, CROSS_EVAL_JSON)
    for item in _items(inputs, "mask_stats"):
        per_value.setdefault(_axis_value(item, params.axis), {})["mask_stats"] = read_table(item.path, MASK_STATS_JSON)
    for item in _items(inputs, "similarity"):
        per_value.setdefault(_axis_value(item, params.axis), {})["similarity"] = read_table(item.path, SIMILARITY_JSON)
    for (value, lang), row in rows.items():
        docs = per_value.get(value, {})
        row["own_relative_perplexity"] = own_relative(docs.get("cross_eval"), lang)
        row["mean_jaccard"] = (docs.get("mask_stats") or {}).get("jaccard_mean")
        row["mean_cka"] = mean_pair_similarity(docs.get("similarity"), params.reference, lang, params.measure)
    return sorted(rows.values(), key=lambda r: (_sortable(r[params.axis]), str(r["language"])))


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int | float) else (1, str(value))


def own_relative(doc: Mapping[str, Any] | None, lang: str) -> float | None:
    """Perplexity of ``lang``'s subnetwork on ``lang`` divided by the full model's on ``lang``."""
    if not doc or lang not in doc.get("rows", []) or FULL not in doc["rows"] or lang not in doc["cols"]:
        return None
    j = doc["cols"].index(lang)
    own, full = doc["perplexity"][doc["rows"].index(lang)][j], doc["perplexity"][doc["rows"].index(FULL)][j]
    return None if own is None or not full else float(own) / float(full)


def mean_pair_similarity(doc: Mapping[str, Any] | None, ref: str, lang: str, measure: str) -> float | None:
    """Mean over layers of the subnetworks' ``measure`` between ``ref`` and ``lang`` (None if absent)."""
    if not doc or lang == ref:
        return None
    pairs = doc.get("pairwise", {}).get(SUBNETWORK, {}).get(measure, {})
    curve = pairs.get(f"{ref}-{lang}") or pairs.get(f"{lang}-{ref}")
    values = [v for v in (curve or []) if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def write_table(rows: Sequence[Mapping[str, Any]], axis: str, out: Path) -> None:
    columns = [axis, "language", "heads_kept", "total_heads", *list(QUANTITIES)[1:]]
    lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r.get(c)) for c in columns) for r in rows]
    (out / "summary.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "summary.md").write_text(f"# Sweep summary along `{axis}`\n\n" + "\n".join(md) + "\n", encoding="utf-8")


def _cell(value: Any) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def quantity_figure(rows: Sequence[Mapping[str, Any]], axis: str, key: str) -> Any:
    """``key`` against the swept value, one line per language (pure: returns a Figure)."""
    from matplotlib.figure import Figure

    from stages.figures import language_colors

    languages = list(dict.fromkeys(str(r["language"]) for r in rows))
    colors = language_colors(languages)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for lang in languages:
        pts = [(r[axis], r[key]) for r in rows if r["language"] == lang and r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[lang], label=lang)
    ax.set_xlabel(axis)
    ax.set_ylabel(QUANTITIES[key])
    if key == "heads_kept":
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{QUANTITIES[key]} vs {axis} (lines of equal values overlap)")
        ax.set_xticks(sorted({r[axis] for r in rows}))
    if not ax.get_title():
        ax.set_title(f"{QUANTITIES[key]} vs {axis}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="language", fontsize=8)
    return fig


@stage(
    "sweep_summary",
    params=SweepSummaryParams,
    inputs={
        "masks": Input("head-mask", many=True),
        "cross_eval": Input("metrics", many=True, optional=True),
        "mask_stats": Input("metrics", many=True, optional=True),
        "similarity": Input("metrics", many=True, optional=True),
    },
    outputs={"figures": "figures"},
    version="2",
)
def sweep_summary_stage(params: SweepSummaryParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Table and plots of heads kept, perplexity, Jaccard and CKA along a swept parameter."""
    from stages.figures import save

    rows = summary_rows(inputs, params)
    if not rows:
        raise ValueError("sweep_summary got no head masks: connect inputs.masks to the pruning stage")
    out = ctx.output_dir("figures")
    write_json(out / "summary.json", {"axis": params.axis, "rows": rows})
    write_table(rows, params.axis, out)
    drawn = []
    for key in QUANTITIES:
        if any(r.get(key) is not None for r in rows):
            save(quantity_figure(rows, params.axis, key), out, f"sweep_{key}")
            drawn.append(key)
    points = sorted({r[params.axis] for r in rows}, key=_sortable)
    return {"figures": {"axis": params.axis, "points": points, "figures": drawn, "rows": len(rows)}}


SWEEP_SUMMARY: StageDef = sweep_summary_stage
