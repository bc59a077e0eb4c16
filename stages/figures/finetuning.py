"""Figures of fine-tuning: each language's perplexity before and after, and the eval perplexity during
training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from stages.figures.base import (
    Interval,
    as_array,
    axes_title,
    bar_labels,
    colors_of,
    interval_lines,
    legend_ncols,
    markers_of,
    study_order,
)


def perplexity_before_after(
    languages: Sequence[str], before: Mapping[str, float], after: Mapping[str, float], *,
    intervals_before: Mapping[str, Interval | None] | None = None,
    intervals_after: Mapping[str, Interval | None] | None = None, split: str | None = None,
) -> Figure:
    """Grouped bars: each language's eval perplexity before and after MLM fine-tuning, with each
    value's interval (a thin black line) where ``intervals_*`` give one; ``split`` names the test
    split the numbers come from."""
    x = np.arange(len(languages))
    fig = Figure(figsize=(max(5.0, 0.9 * len(languages) + 2.0), 3.8), layout="constrained")
    ax = fig.add_subplot()
    w = 0.38
    b1 = ax.bar(x - w / 2, [before.get(lang, math.nan) for lang in languages], w, color="#9ecae1",
                label="before fine-tuning (base model)")
    b2 = ax.bar(x + w / 2, [after.get(lang, math.nan) for lang in languages], w, color="#3182bd",
                label="after fine-tuning (best checkpoint)")
    interval_lines(ax, x - w / 2, [(intervals_before or {}).get(lang) for lang in languages])
    interval_lines(ax, x + w / 2, [(intervals_after or {}).get(lang) for lang in languages])
    bar_labels(ax, b1, ".2f", 7)
    bar_labels(ax, b2, ".2f", 7)
    handles: list[Any] = [b1, b2]
    if intervals_before or intervals_after:
        handles.append(Line2D([], [], color="black", lw=1.2, label="interval"))
    width = float(fig.get_size_inches()[0])
    fig.legend(handles=handles, loc="outside lower center", ncols=legend_ncols([h.get_label() for h in handles], width))
    ax.set_xticks(x, labels=list(languages))
    ax.set_xlabel("eval language (test set)")
    ax.set_ylabel(f"MLM perplexity ({split} split)" if split else "MLM perplexity")
    axes_title(ax, "Per-language perplexity before and after MLM fine-tuning (deterministic masks)")
    ax.margins(y=0.12)
    return fig


def training_curve(
    history: Sequence[Mapping[str, Any]], languages: Sequence[str], best_step: int | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Eval perplexity of every language at each evaluation step of fine-tuning; best step marked."""
    langs = study_order(languages, colors)
    cols, marks = colors_of(langs, colors), markers_of(langs, colors)
    records = sorted(history, key=lambda r: r["step"])
    steps = [int(r["step"]) for r in records]
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for lang in langs:
        ppl = [r.get("languages", {}).get(lang, {}).get("perplexity", math.nan) for r in records]
        ax.plot(steps, as_array(ppl), marker=marks[lang], ms=3.5, color=cols[lang], label=lang)
    if best_step is not None:
        ax.axvline(best_step, color="0.4", ls="--", lw=1, label=f"best checkpoint (step {best_step})")
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("eval perplexity")
    axes_title(ax, "Eval perplexity per language during fine-tuning")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


