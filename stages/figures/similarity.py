"""Figures of representation similarity: full model x subnetwork layer heatmaps, layer-by-layer curves
with floors and bands, subnetworks minus full model, similarity against syntactic distance, token
overlap."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from stages.figures.base import (
    Interval,
    annotate_cells,
    as_array,
    axes_title,
    bar_labels,
    bounds,
    colors_of,
    figure_title,
    finite_pairs,
    format_r,
    interval_lines,
    legend_in_order,
    legend_ncols,
    markers_of,
    pearson_r,
    study_order,
)
from stages.formats.names import BASE, CONTROLS, FULL, LENGTH_FLOOR, MODEL_LABELS, RANDOM, SHUFFLED_FLOOR, SUBNETWORK


def _layer_ticks(layers: Sequence[int]) -> tuple[list[int], list[str]]:
    step = 1 if len(layers) <= 13 else 2
    idx = list(range(0, len(layers), step))
    return idx, [str(layers[i]) for i in idx]


def cka_layer_heatmaps(
    matrices: Mapping[str, Any], layers: Sequence[int], *, ncols: int = 4, measure: str = "linear CKA"
) -> Figure:
    """One panel per language: ``measure`` (CKA) between the full model's layers (rows, y) and that
    language's subnetwork's layers (columns, x), on that language's sentences. Shared 0-1 scale."""
    langs = list(matrices)
    if not langs:
        raise ValueError("no layer-by-layer CKA matrices to draw")
    ncols = max(1, min(ncols, len(langs)))
    nrows = math.ceil(len(langs) / ncols)
    fig = Figure(figsize=(2.7 * ncols + 1.0, 2.6 * nrows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    ticks, labels = _layer_ticks(layers)
    image = None
    for ax, lang in zip(axes, langs, strict=False):
        arr = as_array(matrices[lang])
        image = ax.imshow(np.ma.masked_invalid(arr), cmap="magma", vmin=0.0, vmax=1.0, origin="lower",
                          interpolation="nearest")
        diag = float(np.nanmean(np.diag(arr))) if arr.size else math.nan
        if len(layers) <= 7:
            annotate_cells(ax, image, arr, ".2f")
        axes_title(ax, f"{lang} (diagonal mean {diag:.2f})")
        ax.set_xticks(ticks, labels=labels, fontsize=7)
        ax.set_yticks(ticks, labels=labels, fontsize=7)
        ax.set_xlabel(f"{lang} subnetwork layer")
        ax.set_ylabel("full model layer")
    for ax in axes[len(langs):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(langs)]), label=measure, shrink=0.85)
    figure_title(fig, f"{measure[:1].upper()}{measure[1:]}, full model layer x subnetwork layer (0 = embeddings)")
    return fig


FLOOR_LABELS = {
    LENGTH_FLOOR: "length-matched floor (dotted, in the language's colour)",
    SHUFFLED_FLOOR: "shuffled-row floor (grey band: range over languages)",
}


def similarity_curves(
    layers: Sequence[int], reference: str, pairwise: Mapping[str, Mapping[str, Sequence[float]]],
    *, measure: str = "cka", colors: Mapping[str, str] | None = None,
    floors: Mapping[str, Mapping[str, Mapping[str, Sequence[float | None]]]] | None = None,
    spreads: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
) -> Figure:
    """Layer-by-layer similarity of ``reference`` with each language, one panel per model.

    ``pairwise[model][lang]`` is the curve (one value per layer) of ``reference`` vs ``lang``.
    Panels: the full model and the subnetworks (solid lines), then the base and random-init
    controls (dashed lines). The full and subnetwork panels also show the random-init control's
    mean over languages as a grey dashed line. Optional, per model: ``spreads[model][lang]`` ([lo,
    hi] per layer) as a shaded band around the curve; ``floors[model]["length_matched"][lang]`` as a
    dotted line in the language's colour and ``floors[model]["shuffled"]`` as a grey band (the range
    over languages).
    """
    models = [m for m in (FULL, SUBNETWORK, *CONTROLS) if m in pairwise]
    models += [m for m in pairwise if m not in models]
    if not models:
        raise ValueError("no similarity curves to draw")
    langs = study_order((lang for m in models for lang in pairwise[m]), colors)
    style = {"colors": colors_of(langs, colors), "markers": markers_of(langs, colors)}
    ncols = min(2, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig = Figure(figsize=(5.0 * ncols + 1.2, 3.4 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    x = np.asarray(layers)
    control_mean = _mean_curve(pairwise.get("random", {}))
    extra: dict[str, Any] = {}
    for ax, model in zip(axes, models, strict=False):
        dashed = model in CONTROLS
        curves = {lang: pairwise[model][lang] for lang in langs if lang in pairwise[model]}
        _draw_curves(ax, x, curves, style, dashed, (spreads or {}).get(model) or {})
        extra |= _draw_floors(ax, x, (floors or {}).get(model) or {}, style["colors"])
        if not dashed and control_mean is not None:
            ax.plot(x, control_mean, ls="--", lw=1.4, color="black", alpha=0.6, label="random-init control (mean)")
        axes_title(ax, MODEL_LABELS.get(model, model))
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_xticks(*_layer_ticks_x(layers))
        ax.grid(alpha=0.25)
        ax.yaxis.set_tick_params(labelleft=True)
    for ax in axes[len(models):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"{measure} ({reference} vs language)")
    handles, labels = legend_in_order(*_unique_legend(axes[: len(models)]), langs)
    fig.legend(handles + list(extra.values()), labels + list(extra), loc="outside right center")
    figure_title(fig, f"Layer-by-layer {measure}: {reference} vs each language (same sentences)")
    return fig


def _draw_curves(ax: Axes, x: np.ndarray, curves: Mapping[str, Sequence[float]], style: Mapping[str, Any],
                 dashed: bool, spreads: Mapping[str, Sequence[Any]]) -> None:
    for lang, values in curves.items():
        color = style["colors"][lang]
        if spreads.get(lang):
            lo, hi = bounds(spreads[lang], len(x))
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0, label="_nolegend_")
        ax.plot(x, as_array(values), marker=style["markers"][lang], ms=3, lw=1.3, ls="--" if dashed else "-",
                color=color, label=lang)


def _draw_floors(ax: Axes, x: np.ndarray, floors: Mapping[str, Mapping[str, Sequence[float | None]]],
                 colors: Mapping[str, str]) -> dict[str, Any]:
    """Draw a model's floors; return the legend entries they need (label -> proxy artist)."""
    extra: dict[str, Any] = {}
    matched = {lang: c for lang, c in (floors.get(LENGTH_FLOOR) or {}).items() if lang in colors and c}
    for lang, curve in matched.items():
        ax.plot(x, as_array(curve), ls=":", lw=1.2, color=colors[lang], label="_nolegend_")
    if matched:
        extra[FLOOR_LABELS[LENGTH_FLOOR]] = Line2D([], [], ls=":", lw=1.2, color="black")
    shuffled = [as_array(c) for lang, c in (floors.get(SHUFFLED_FLOOR) or {}).items() if lang in colors and c]
    if shuffled:
        stack = np.stack(shuffled)
        lo, hi = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
        band = ax.fill_between(x, lo, hi, color="0.55", alpha=0.3, lw=0.6, edgecolor="0.45", label="_nolegend_")
        extra[FLOOR_LABELS[SHUFFLED_FLOOR]] = band
    return extra


def _layer_ticks_x(layers: Sequence[int]) -> tuple[list[int], list[str]]:
    idx, labels = _layer_ticks(layers)
    return [int(layers[i]) for i in idx], labels


def _mean_curve(curves: Mapping[str, Sequence[float]]) -> np.ndarray | None:
    if not curves:
        return None
    return np.nanmean(np.stack([as_array(v) for v in curves.values()]), axis=0)


def _unique_legend(axes: Iterable[Axes]) -> tuple[list[Any], list[str]]:
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def similarity_differences(
    differences: Mapping[str, float], *, reference: str, measure: str = "cka", where: str = "mean over layers",
    intervals: Mapping[str, Interval | None] | None = None, floor_differences: Mapping[str, float] | None = None,
    interval_label: str = "approximate interval",
) -> Figure:
    """Bars per language: similarity with ``reference`` of the subnetworks minus the full model's.

    ``intervals[lang]``: an interval of the difference (thin black line), named in the legend by
    ``interval_label`` (a paired interval, from the same resamples for both models, or an approximate
    one); ``floor_differences[lang]``: the same difference between the two models' length-matched floors
    (a hollow diamond), i.e. how much of the difference sentence length alone would give.
    """
    langs = list(differences)
    values = [differences[lang] for lang in langs]
    x = np.arange(len(langs), dtype=float)
    fig = Figure(figsize=(max(4.8, 0.7 * len(langs) + 2.2), 3.8), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#d6604d" if (v is not None and v < 0) else "#4393c3" for v in values]
    bars = ax.bar(x, as_array(values), width=0.6, color=colors)
    handles: list[Any] = []
    if intervals:
        interval_lines(ax, x, [intervals.get(lang) for lang in langs])
        handles.append(Line2D([], [], color="black", lw=1.2, label=interval_label))
    labels = [format(v, "+.3f") if v is not None and math.isfinite(v) else "n/a" for v in values]
    ax.bar_label(bars, labels=labels, label_type="center" if intervals else "edge", padding=2, fontsize=7.5)
    given = [(i, (floor_differences or {}).get(lang)) for i, lang in enumerate(langs)]
    floor = [(i, float(v)) for i, v in given if v is not None and math.isfinite(v)]
    if floor:
        handles += ax.plot([i + 0.38 for i, _ in floor], [v for _, v in floor], ls="none", marker="D", ms=5,
                           mfc="none", mew=1.3, color="black", label="same difference between the length-matched floors")
    ax.axhline(0, color="black", lw=0.8)
    ax.margins(y=0.2)
    ax.set_xticks(x, labels=langs)
    ax.set_xlabel("language")
    ax.set_ylabel(f"Δ {measure} (subnetwork − full)")
    axes_title(ax, f"{measure} with {reference}: subnetworks minus full model ({where})")
    if handles:
        width = float(fig.get_size_inches()[0])
        fig.legend(handles=handles, loc="outside lower center", ncols=legend_ncols([h.get_label() for h in handles], width))
    return fig


def similarity_vs_distance(
    distance: Mapping[str, float], similarity: Mapping[str, Mapping[str, float]], *, reference: str,
    measure: str = "cka", where: str = "mean over layers", method: str | None = None,
    intervals: Mapping[str, Mapping[str, Interval | None]] | None = None, confidence: float = 0.95,
) -> Figure:
    """Scatter: syntactic distance to ``reference`` (x) vs similarity with ``reference`` (y), one
    marker per model in ``similarity`` (``{model: {lang: value}}``), languages labelled; Pearson r of
    each model with its ``confidence`` interval (Fisher z) and the number of languages n in the
    legend, the full model's (or the first model's) in the title. ``intervals[model][lang]``: each
    value's interval, drawn as a vertical line."""
    models = list(similarity)
    markers = {FULL: "o", SUBNETWORK: "s", BASE: "^", RANDOM: "v"}
    fig = Figure(figsize=(5.8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    stats: dict[str, str] = {}
    for k, model in enumerate(models):
        langs = [lang for lang in distance if lang in similarity[model]]
        x = [distance[lang] for lang in langs]
        y = [similarity[model][lang] for lang in langs]
        stats[model] = format_r(pearson_r(x, as_array(y).tolist()), finite_pairs(x, y), confidence)
        ax.scatter(x, as_array(y), marker=markers.get(model, "D"), s=36, zorder=3,
                   label=f"{MODEL_LABELS.get(model, model)} ({stats[model]})", color=f"C{k}")
        interval_lines(ax, x, [((intervals or {}).get(model) or {}).get(lang) for lang in langs], color=f"C{k}")
        for lang, xi, yi in zip(langs, x, y, strict=True):
            if yi is not None and math.isfinite(yi):
                ax.annotate(lang, (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=8)
    main = FULL if FULL in stats else (models[0] if models else None)
    r_main = stats[main] if main else "r undefined"
    ax.set_xlabel(f"syntactic distance to {reference}" + (f" ({method})" if method else ""))
    ax.set_ylabel(f"{measure} with {reference} ({where})")
    axes_title(ax, f"{measure} vs syntactic distance to {reference}: Pearson {r_main}"
           + (f" ({MODEL_LABELS.get(main, main)})" if main and len(models) > 1 else ""))
    ax.grid(alpha=0.25)
    ax.margins(0.15)
    fig.legend(loc="outside lower center", ncols=1)
    return fig


def token_overlap_bars(
    overlap: Mapping[str, float], *, reference: str, n: int | None = None, colors: Mapping[str, str] | None = None,
) -> Figure:
    """Bars per language: mean share of a sentence's token types that also occur in ``reference``'s
    translation of the sentence (special tokens excluded)."""
    langs = list(overlap)
    cols = colors_of(langs, colors)
    fig = Figure(figsize=(max(4.6, 0.7 * len(langs) + 2.2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(langs, as_array([overlap[lang] for lang in langs]), color=[cols[lang] for lang in langs])
    bar_labels(ax, bars, ".2f")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("language")
    ax.set_ylabel(f"token overlap with {reference}")
    axes_title(ax, f"Token overlap with {reference}" + (f" (mean over {n} parallel sentences)" if n else ""))
    return fig
