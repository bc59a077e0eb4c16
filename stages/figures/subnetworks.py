"""Figures of the subnetworks: the cross-evaluation heatmaps (rows = subnetwork, columns = eval language),
the Jaccard of kept heads (and minus chance), the heads masked per layer, and the pruning trajectories."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from stages.figures.base import (
    annotate_cells,
    annotates,
    as_array,
    axes_title,
    bounds,
    coinciding_labels,
    colors_of,
    diverging_scale,
    dodge,
    draw_heatmap,
    figure_title,
    finite_range,
    mark_center,
    markers_of,
    split_text,
    study_order,
)
from stages.formats.names import FULL

RANDOM_ROW = "random"  # cross-evaluation rows of size-matched random masks start with this word


def _row_breaks(rows: Sequence[str]) -> list[float]:
    """y positions of the lines above the full model's row and above the first random-mask row."""
    out = []
    for i, row in enumerate(rows):
        first_random = row.startswith(RANDOM_ROW) and not rows[i - 1].startswith(RANDOM_ROW)
        if i > 0 and (row == FULL or first_random):
            out.append(i - 0.5)
    return out


def cross_eval_heatmap(
    rows: Sequence[str], cols: Sequence[str], values: Any, *, relative: bool = False,
    baseline: str = "the full model", spread: Any = None, split: str | None = None,
) -> Figure:
    """Heatmap of perplexity, **rows = subnetwork** (+ the full model's row, + rows of size-matched
    random masks whose labels start with ``"random"``), **columns = eval language**.

    ``relative=True``: ``values`` are perplexities divided by ``baseline``'s on the same cell
    or column; a diverging colour bar over the data's range with its neutral colour at 1 (blue:
    better than the baseline, red: worse). ``spread``: a matrix of ± half-widths (None or NaN where
    there is none) written under the values. Each language's own subnetwork on its own test set is
    outlined; ``split`` names the test split.
    """
    arr = as_array(values)
    if arr.shape != (len(rows), len(cols)):
        raise ValueError(f"cross-eval matrix has shape {arr.shape}, labels say {(len(rows), len(cols))}")
    fig = Figure(figsize=(max(5.2, 0.62 * len(cols) + 2.9), max(3.6, 0.42 * len(rows) + 1.9)),
                 layout="constrained")
    ax = fig.add_subplot()
    if relative:
        norm, cmap = diverging_scale(arr, center=1.0)
        fmt, label, title = ".3f", f"perplexity ÷ perplexity of\n{baseline}", f"Perplexity relative to {baseline}"
    else:
        norm, cmap = mcolors.Normalize(*finite_range(arr)), matplotlib.colormaps["viridis"]
        fmt, label, title = ".2f", "perplexity", "Cross-language perplexity of the subnetworks"
    image = draw_heatmap(ax, arr, rows, cols, cmap=cmap, norm=norm, fmt=fmt)
    if annotates(rows, cols):
        annotate_cells(ax, image, arr, fmt, spread=None if spread is None else as_array(spread))
    for i, r in enumerate(rows):
        if r in cols:
            ax.add_patch(Rectangle((cols.index(r) - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.6))
    for y in _row_breaks(rows):
        ax.axhline(y, color="white", lw=3)
    ax.set_xlabel(f"eval language (test set{split_text(split)})")
    ax.set_ylabel("subnetwork (mask pruned on language)")
    axes_title(ax, f"{title}\nrows: subnetwork, columns: eval language; outlined: own language", reserve=1.0)
    bar = fig.colorbar(image, ax=ax, label=label, shrink=0.9)
    if relative:
        mark_center(bar, 1.0)
    return fig


def jaccard_heatmap(
    labels: Sequence[str], matrix: Any, *, chance: Any = None, chance_interval: Any = None
) -> Figure:
    """Jaccard index of the kept heads for every pair of languages' subnetworks.

    With ``chance`` (the Jaccard expected of random masks of the same sizes, same layout), a second
    panel shows observed minus chance on a diverging scale centred at 0; ``*`` marks a pair outside
    its ``chance_interval`` ([lo, hi] per cell).
    """
    arr = as_array(matrix)
    n = len(labels)
    panels = 1 if chance is None else 2
    fig = Figure(figsize=(max(4.2, 0.55 * n + 2.4) * panels, max(3.6, 0.5 * n + 1.6)), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False).ravel()
    off_diag = ~np.eye(n, dtype=bool)
    off = arr[off_diag] if n > 1 else arr.ravel()
    lo = float(np.nanmin(off)) if off.size else 0.0
    norm = mcolors.Normalize(vmin=min(lo, 0.999), vmax=1.0)
    image = draw_heatmap(axes[0], arr, labels, labels, cmap="viridis", norm=norm, fmt=".2f")
    if annotates(labels, labels):
        annotate_cells(axes[0], image, arr, ".2f")
    mean = float(np.nanmean(off)) if n > 1 else math.nan
    expected = f"; chance {float(np.nanmean(as_array(chance)[off_diag])):.2f}" if chance is not None and n > 1 else ""
    axes[0].set_xlabel("language")
    axes[0].set_ylabel("language")
    axes_title(axes[0], f"Jaccard index of kept heads (mean over pairs {mean:.2f}{expected})", reserve=1.0)
    fig.colorbar(image, ax=axes[0], label="|kept A ∩ kept B| / |kept A ∪ kept B|", shrink=0.9)
    if chance is not None:
        _jaccard_vs_chance(fig, axes[1], labels, arr, as_array(chance), chance_interval)
    return fig


def _jaccard_vs_chance(fig: Figure, ax: Axes, labels: Sequence[str], observed: np.ndarray, chance: np.ndarray,
                       interval: Any) -> None:
    n = len(labels)
    diff = observed - chance
    diff[np.eye(n, dtype=bool)] = math.nan
    norm, cmap = diverging_scale(diff, center=0.0, cmap="PuOr_r")
    image = draw_heatmap(ax, diff, labels, labels, cmap=cmap, norm=norm, fmt="+.2f")
    marks = np.zeros_like(diff, dtype=bool)
    if interval is not None:
        lo = np.array([[bounds([c], 1)[0][0] for c in row] for row in interval])
        hi = np.array([[bounds([c], 1)[1][0] for c in row] for row in interval])
        marks = (observed < lo) | (observed > hi)
    if annotates(labels, labels):
        annotate_cells(ax, image, diff, "+.2f", marks=marks, missing="")
    ax.set_xlabel("language")
    axes_title(ax, "Observed minus chance (random masks of the same sizes)"
           + ("; *: outside the chance interval" if interval is not None else ""), reserve=1.0)
    bar = fig.colorbar(image, ax=ax, label="Jaccard − chance Jaccard", shrink=0.9)
    mark_center(bar, 0.0)


def masked_per_layer(
    mean: Sequence[float], by_language: Mapping[str, Sequence[float]] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Proportion of heads masked in each layer: the mean over languages (black) and each language.

    Layers are numbered from 1. The mean line's label is ``"mean over languages"``. Languages are
    drawn in the study's order, each with its own marker and a small sideways offset, so that
    identical lines stay visible; a line identical to an earlier one says so in the legend.
    """
    by_language = dict(by_language or {})
    langs = study_order(by_language, colors)
    cols, marks = colors_of(langs, colors), markers_of(langs, colors)
    labels = coinciding_labels({lang: by_language[lang] for lang in langs})
    x = np.arange(1, len(mean) + 1)
    fig = Figure(figsize=(max(5.0, 0.35 * len(mean) + 3.0), 3.8), layout="constrained")
    ax = fig.add_subplot()
    for lang, dx in zip(langs, dodge(len(langs)), strict=True):
        ax.plot(x + dx, as_array(by_language[lang]), marker=marks[lang], ms=4, lw=1, alpha=0.85, color=cols[lang],
                label=labels[lang])
    ax.plot(x, as_array(mean), marker="o", lw=2.4, color="black", label="mean over languages", zorder=5)
    ax.set_xticks(x)
    ax.set_xlabel("layer (1 = first transformer layer)")
    ax.set_ylabel("proportion of the layer's heads masked")
    top = max([float(np.nanmax(as_array(mean))) if len(mean) else 0.0]
              + [float(np.nanmax(as_array(v))) for v in by_language.values() if len(v)])
    ax.set_ylim(-0.02, max(0.05, top * 1.12))
    axes_title(ax, "Proportion of attention heads masked per layer")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _trajectory_arrays(points: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts = sorted(points, key=lambda p: p["step"])
    heads = np.array([float(p["heads_kept"]) for p in pts])
    ppl = np.array([math.nan if p.get("perplexity") is None else float(p["perplexity"]) for p in pts])
    accepted = np.array([bool(p.get("accepted", True)) for p in pts])
    return heads, ppl, accepted


def _plot_trajectory(ax: Axes, heads: np.ndarray, values: np.ndarray, accepted: np.ndarray, color: str,
                     label: str) -> None:
    ax.plot(heads[accepted], values[accepted], marker="o", ms=3.5, lw=1.4, color=color, label=label)
    rejected = ~accepted
    if rejected.any():
        last = np.flatnonzero(accepted)[-1] if accepted.any() else None
        for k in np.flatnonzero(rejected):
            if last is not None:
                ax.plot(heads[[last, k]], values[[last, k]], ls=":", lw=1, color=color)
            ax.plot(heads[k], values[k], marker="x", ms=7, mew=1.8, ls="none", color=color)


def pruning_trajectories(
    trajectories: Mapping[str, Sequence[Mapping[str, Any]]], thresholds: Mapping[str, float | None] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Heads kept vs perplexity at each pruning step, per language (left: absolute; right: relative
    to the unpruned start, with the stopping threshold). Rejected steps are crosses.

    ``trajectories[lang]`` is the prune stage's trajectory.json list; ``thresholds[lang]`` the
    threshold factor (perplexity may grow to ``P0 * threshold``). Languages in the study's order.
    """
    langs = study_order(trajectories, colors)
    cols = colors_of(langs, colors)
    thresholds = dict(thresholds or {})
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    ax_abs, ax_rel = fig.subplots(1, 2)
    for lang in langs:
        heads, ppl, accepted = _trajectory_arrays(trajectories[lang])
        if heads.size == 0:
            continue
        p0 = ppl[0]
        _plot_trajectory(ax_abs, heads, ppl, accepted, cols[lang], lang)
        _plot_trajectory(ax_rel, heads, ppl / p0, accepted, cols[lang], lang)
        factor = thresholds.get(lang)
        if factor is not None and math.isfinite(p0):
            ax_abs.axhline(p0 * factor, color=cols[lang], ls="--", lw=0.8, alpha=0.7)
    for factor in sorted({f for f in thresholds.values() if f is not None}):
        ax_rel.axhline(factor, color="black", ls="--", lw=1.2, label=f"threshold (x{factor:g})")
    for ax in (ax_abs, ax_rel):
        ax.set_xlabel("heads kept")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.xaxis_inverted():
            ax.invert_xaxis()  # pruning proceeds to the right
    ax_abs.set_ylabel("perplexity on the language's test set")
    ax_abs.set_title("Absolute (dashed: each language's threshold)")
    ax_rel.set_ylabel("perplexity / unpruned perplexity")
    ax_rel.set_title("Relative to the unpruned model")
    ax_rel.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), title="x: rejected step")
    figure_title(fig, "Iterative head pruning: perplexity vs heads kept")
    return fig


