"""The study's figures: one pure function per figure, plain data in, a matplotlib ``Figure`` out.

Nothing here reads artifacts (that is :mod:`stages.report`'s job) and nothing uses ``pyplot``: every
figure is a :class:`matplotlib.figure.Figure` built with the object-oriented API, so no GUI backend
is selected, no global figure registry fills up, and figures are garbage-collected like any object.
:func:`save` writes PNG (Agg, 150 dpi) and PDF with the volatile metadata (software version, creation
date) removed, so identical data give byte-identical files with the same matplotlib version.

Conventions shared by all figures:

- cross-evaluation matrices: **rows = subnetwork** (the language whose mask is applied, plus the full
  model), **columns = eval language** (the test set); the original study's heatmap had them swapped;
- head-mask layers are numbered from 1 (the first transformer layer); hidden-state layers of the
  similarity measures are numbered as the ``similarity`` stage numbers them (0 = embeddings);
- one colour per language across figures when the caller passes ``colors``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

DPI = 150
FORMATS = ("png", "pdf")
FULL = "full"

# rcParams that make output reproducible (svg.hashsalt: SVG ids; the rest: stable, readable defaults)
STYLE: dict[str, Any] = {
    "svg.hashsalt": "cross-lingual-subnets",
    "font.size": 9,
    "axes.titlesize": 10,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
PNG_METADATA: dict[str, Any] = {"Software": None}
PDF_METADATA: dict[str, Any] = {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None}

CONTROL_MODELS = ("base", "random")
MODEL_LABELS = {
    "full": "full fine-tuned model",
    "subnetwork": "language subnetworks",
    "base": "base model (control)",
    "random": "random-init model (control)",
}

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@contextmanager
def style() -> Iterator[None]:
    """The rcParams every figure of the report is drawn and saved with."""
    with matplotlib.rc_context(STYLE):
        yield


def save(fig: Figure, out_dir: Path | str, name: str) -> list[str]:
    """Write ``<name>.png`` (150 dpi) and ``<name>.pdf`` into ``out_dir``; return the file names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with style():
        fig.savefig(out / f"{name}.png", dpi=DPI, metadata=PNG_METADATA)
        fig.savefig(out / f"{name}.pdf", metadata=PDF_METADATA)
    return [f"{name}.{ext}" for ext in FORMATS]


def language_colors(languages: Sequence[str]) -> dict[str, str]:
    """One colour per language, in order (tab10, tab20 beyond ten languages)."""
    cmap = matplotlib.colormaps["tab10" if len(languages) <= 10 else "tab20"]
    return {lang: mcolors.to_hex(cmap(i % cmap.N)) for i, lang in enumerate(languages)}


def _colors(languages: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    base = language_colors(languages)
    return {lang: (colors or {}).get(lang, base[lang]) for lang in languages}


def wrap_title(text: str, width_in: float, fontsize: float = 10.0) -> str:
    """``text`` wrapped so that each line fits in ``width_in`` inches (titles wider than the figure
    are clipped: constrained layout cannot make room for them)."""
    chars = max(20, int(0.88 * width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def _title(ax: Axes, text: str) -> None:
    """An axes title wrapped to the figure's width."""
    fig = ax.get_figure()
    width = float(fig.get_size_inches()[0]) if fig is not None else 6.0
    ax.set_title(wrap_title(text, width, 10.0))


def _suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    fig.suptitle(wrap_title(text, float(fig.get_size_inches()[0]), 11.0))


def as_array(values: Any) -> np.ndarray:
    """A float array of ``values`` with ``None`` (JSON for inf/NaN) as NaN."""
    return np.array(
        [[math.nan if v is None else v for v in row] for row in values] if _is_nested(values)
        else [math.nan if v is None else v for v in values],
        dtype=float,
    )


def _is_nested(values: Any) -> bool:
    return len(values) > 0 and isinstance(values[0], list | tuple | np.ndarray)


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of finite pairs; None with fewer than 3 pairs or a constant variable."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _fmt_r(r: float | None) -> str:
    return "r undefined" if r is None else f"r = {r:.2f}"


def _text_color(rgba: Sequence[float]) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _annotate_cells(ax: Axes, image: Any, values: np.ndarray, fmt: str) -> None:
    """Write each cell's value into a heatmap (``n/a`` for NaN), black or white by background."""
    n_rows, n_cols = values.shape
    size = 8 if max(n_rows, n_cols) <= 9 else 6.5
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=size, color="0.3")
                continue
            color = _text_color(image.cmap(image.norm(v)))
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=size, color=color)


def _heatmap(ax: Axes, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, cmap: str,
             norm: mcolors.Normalize, fmt: str | None) -> Any:
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels=list(cols))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if fmt is not None and max(len(rows), len(cols)) <= 16:
        _annotate_cells(ax, image, values, fmt)
    return image


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def _bar_labels(ax: Axes, bars: Any, fmt: str, size: float = 7.5) -> None:
    labels = [format(h, fmt) if math.isfinite(h) else "n/a" for h in (b.get_height() for b in bars)]
    ax.bar_label(bars, labels=labels, padding=2, fontsize=size)


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------


def perplexity_before_after(
    languages: Sequence[str], before: Mapping[str, float], after: Mapping[str, float]
) -> Figure:
    """Grouped bars: each language's eval perplexity before and after MLM fine-tuning."""
    x = np.arange(len(languages))
    fig = Figure(figsize=(max(5.0, 0.9 * len(languages) + 2.0), 3.8), layout="constrained")
    ax = fig.add_subplot()
    w = 0.38
    b1 = ax.bar(x - w / 2, [before.get(lang, math.nan) for lang in languages], w, color="#9ecae1",
                label="before fine-tuning (base model)")
    b2 = ax.bar(x + w / 2, [after.get(lang, math.nan) for lang in languages], w, color="#3182bd",
                label="after fine-tuning (best checkpoint)")
    _bar_labels(ax, b1, ".2f", 7)
    _bar_labels(ax, b2, ".2f", 7)
    fig.legend(handles=[b1, b2], loc="outside lower center", ncols=2)
    ax.set_xticks(x, labels=list(languages))
    ax.set_xlabel("eval language (test set)")
    ax.set_ylabel("MLM perplexity (deterministic masks)")
    _title(ax, "Per-language perplexity before and after MLM fine-tuning")
    ax.margins(y=0.12)
    return fig


def training_curve(
    history: Sequence[Mapping[str, Any]], languages: Sequence[str], best_step: int | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Eval perplexity of every language at each evaluation step of fine-tuning; best step marked."""
    cols = _colors(languages, colors)
    records = sorted(history, key=lambda r: r["step"])
    steps = [int(r["step"]) for r in records]
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for lang in languages:
        ppl = [r.get("languages", {}).get(lang, {}).get("perplexity", math.nan) for r in records]
        ax.plot(steps, as_array(ppl), marker="o", ms=3, color=cols[lang], label=lang)
    if best_step is not None:
        ax.axvline(best_step, color="0.4", ls="--", lw=1, label=f"best checkpoint (step {best_step})")
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("eval perplexity")
    _title(ax, "Eval perplexity per language during fine-tuning")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


# --------------------------------------------------------------------------------------------------
# Subnetworks: cross-evaluation, masks, pruning
# --------------------------------------------------------------------------------------------------


def cross_eval_heatmap(
    rows: Sequence[str], cols: Sequence[str], values: Any, *, relative: bool = False
) -> Figure:
    """Heatmap of perplexity, **rows = subnetwork** (+ the full model's row), **columns = eval language**.

    ``relative=True``: ``values`` are perplexities divided by the full model's on the same column;
    a diverging colour map centred on 1 (blue: better than the full model, red: worse). Each
    language's own subnetwork on its own test set is outlined.
    """
    arr = as_array(values)
    if arr.shape != (len(rows), len(cols)):
        raise ValueError(f"cross-eval matrix has shape {arr.shape}, labels say {(len(rows), len(cols))}")
    fig = Figure(figsize=(max(4.5, 0.62 * len(cols) + 2.6), max(3.4, 0.42 * len(rows) + 1.8)),
                 layout="constrained")
    ax = fig.add_subplot()
    if relative:
        lo, hi = _finite_range(arr)
        norm: mcolors.Normalize = mcolors.TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.999), vmax=max(hi, 1.001))
        image = _heatmap(ax, arr, rows, cols, cmap="RdBu_r", norm=norm, fmt=".3f")
        label, title = "perplexity / full model's perplexity", "Perplexity relative to the full model"
    else:
        norm = mcolors.Normalize(*_finite_range(arr))
        image = _heatmap(ax, arr, rows, cols, cmap="viridis", norm=norm, fmt=".2f")
        label, title = "perplexity", "Cross-language perplexity of the subnetworks"
    for i, r in enumerate(rows):
        if r in cols:
            ax.add_patch(Rectangle((cols.index(r) - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.6))
    if FULL in rows:
        ax.axhline(list(rows).index(FULL) - 0.5, color="white", lw=3)
    ax.set_xlabel("eval language (test set)")
    ax.set_ylabel("subnetwork (mask pruned on language)")
    _title(ax, f"{title}\nrows: subnetwork, columns: eval language; outlined: own language")
    fig.colorbar(image, ax=ax, label=label, shrink=0.9)
    return fig


def jaccard_heatmap(labels: Sequence[str], matrix: Any) -> Figure:
    """Jaccard index of the kept heads for every pair of languages' subnetworks."""
    arr = as_array(matrix)
    n = len(labels)
    fig = Figure(figsize=(max(4.2, 0.55 * n + 2.4), max(3.6, 0.5 * n + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    off = arr[~np.eye(n, dtype=bool)] if n > 1 else arr.ravel()
    lo = float(np.nanmin(off)) if off.size else 0.0
    norm = mcolors.Normalize(vmin=min(lo, 0.999), vmax=1.0)
    image = _heatmap(ax, arr, labels, labels, cmap="viridis", norm=norm, fmt=".2f")
    mean = float(np.nanmean(off)) if n > 1 else math.nan
    ax.set_xlabel("language")
    ax.set_ylabel("language")
    _title(ax, f"Jaccard index of kept heads (mean over pairs {mean:.2f})")
    fig.colorbar(image, ax=ax, label="|kept A ∩ kept B| / |kept A ∪ kept B|", shrink=0.9)
    return fig


def masked_per_layer(
    mean: Sequence[float], by_language: Mapping[str, Sequence[float]] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Proportion of heads masked in each layer: the mean over languages (black) and each language.

    Layers are numbered from 1. The mean line's label is ``"mean over languages"``.
    """
    by_language = dict(by_language or {})
    cols = _colors(list(by_language), colors)
    x = np.arange(1, len(mean) + 1)
    fig = Figure(figsize=(max(5.0, 0.35 * len(mean) + 3.0), 3.8), layout="constrained")
    ax = fig.add_subplot()
    for lang, values in by_language.items():
        ax.plot(x, as_array(values), marker=".", lw=1, alpha=0.75, color=cols[lang], label=lang)
    ax.plot(x, as_array(mean), marker="o", lw=2.4, color="black", label="mean over languages", zorder=5)
    ax.set_xticks(x)
    ax.set_xlabel("layer (1 = first transformer layer)")
    ax.set_ylabel("proportion of the layer's heads masked")
    top = max([float(np.nanmax(as_array(mean))) if len(mean) else 0.0]
              + [float(np.nanmax(as_array(v))) for v in by_language.values() if len(v)])
    ax.set_ylim(-0.02, max(0.05, top * 1.12))
    _title(ax, "Proportion of attention heads masked per layer")
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
    threshold factor (perplexity may grow to ``P0 * threshold``).
    """
    langs = list(trajectories)
    cols = _colors(langs, colors)
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
    _suptitle(fig, "Iterative head pruning: perplexity vs heads kept")
    return fig


# --------------------------------------------------------------------------------------------------
# Representation similarity
# --------------------------------------------------------------------------------------------------


def _layer_ticks(layers: Sequence[int]) -> tuple[list[int], list[str]]:
    step = 1 if len(layers) <= 13 else 2
    idx = list(range(0, len(layers), step))
    return idx, [str(layers[i]) for i in idx]


def cka_layer_heatmaps(
    matrices: Mapping[str, Any], layers: Sequence[int], *, ncols: int = 4
) -> Figure:
    """One panel per language: linear CKA between the full model's layers (rows, y) and that
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
            _annotate_cells(ax, image, arr, ".2f")
        _title(ax, f"{lang} (diagonal mean {diag:.2f})")
        ax.set_xticks(ticks, labels=labels, fontsize=7)
        ax.set_yticks(ticks, labels=labels, fontsize=7)
        ax.set_xlabel(f"{lang} subnetwork layer")
        ax.set_ylabel("full model layer")
    for ax in axes[len(langs):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(langs)]), label="linear CKA", shrink=0.85)
    _suptitle(fig, "Linear CKA, full model layer x subnetwork layer (0 = embeddings)")
    return fig


def similarity_curves(
    layers: Sequence[int], reference: str, pairwise: Mapping[str, Mapping[str, Sequence[float]]],
    *, measure: str = "cka", colors: Mapping[str, str] | None = None,
) -> Figure:
    """Layer-by-layer similarity of ``reference`` with each language, one panel per model.

    ``pairwise[model][lang]`` is the curve (one value per layer) of ``reference`` vs ``lang``.
    Panels: the full model and the subnetworks (solid lines), then the base and random-init
    controls (dashed lines). The full and subnetwork panels also show the random-init control's
    mean over languages as a grey dashed line.
    """
    models = [m for m in ("full", "subnetwork", *CONTROL_MODELS) if m in pairwise]
    models += [m for m in pairwise if m not in models]
    if not models:
        raise ValueError("no similarity curves to draw")
    langs = list(dict.fromkeys(lang for m in models for lang in pairwise[m]))
    cols = _colors(langs, colors)
    ncols = min(2, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig = Figure(figsize=(5.0 * ncols + 1.2, 3.4 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    x = np.asarray(layers)
    control_mean = _mean_curve(pairwise.get("random", {}))
    for ax, model in zip(axes, models, strict=False):
        dashed = model in CONTROL_MODELS
        for lang, values in pairwise[model].items():
            ax.plot(x, as_array(values), marker="o", ms=2.5, lw=1.3, ls="--" if dashed else "-",
                    color=cols[lang], label=lang)
        if not dashed and control_mean is not None:
            ax.plot(x, control_mean, ls="--", lw=1.4, color="black", alpha=0.6, label="random-init control (mean)")
        _title(ax, MODEL_LABELS.get(model, model))
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_xticks(*_layer_ticks_x(layers))
        ax.grid(alpha=0.25)
        ax.yaxis.set_tick_params(labelleft=True)
    for ax in axes[len(models):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"{measure} ({reference} vs language)")
    handles, labels = _unique_legend(axes[: len(models)])
    fig.legend(handles, labels, loc="outside right center")
    _suptitle(fig, f"Layer-by-layer {measure}: {reference} vs each language (same sentences)")
    return fig


def _layer_ticks_x(layers: Sequence[int]) -> tuple[list[int], list[str]]:
    idx, labels = _layer_ticks(layers)
    return [int(layers[i]) for i in idx], labels


def _mean_curve(curves: Mapping[str, Sequence[float]]) -> np.ndarray | None:
    if not curves:
        return None
    return np.nanmean(np.stack([as_array(v) for v in curves.values()]), axis=0)


def _unique_legend(axes: Sequence[Axes]) -> tuple[list[Any], list[str]]:
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def similarity_differences(
    differences: Mapping[str, float], *, reference: str, measure: str = "cka", where: str = "mean over layers",
) -> Figure:
    """Bars per language: similarity with ``reference`` of the subnetworks minus the full model's."""
    langs = list(differences)
    values = [differences[lang] for lang in langs]
    fig = Figure(figsize=(max(4.8, 0.7 * len(langs) + 2.2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#d6604d" if (v is not None and v < 0) else "#4393c3" for v in values]
    bars = ax.bar(langs, as_array(values), color=colors)
    _bar_labels(ax, bars, "+.3f")
    ax.axhline(0, color="black", lw=0.8)
    ax.margins(y=0.2)
    ax.set_xlabel("language")
    ax.set_ylabel(f"Δ {measure} (subnetwork − full)")
    _title(ax, f"{measure} with {reference}: subnetworks minus full model ({where})")
    return fig


def similarity_vs_distance(
    distance: Mapping[str, float], similarity: Mapping[str, Mapping[str, float]], *, reference: str,
    measure: str = "cka", where: str = "mean over layers", method: str | None = None,
) -> Figure:
    """Scatter: syntactic distance to ``reference`` (x) vs similarity with ``reference`` (y), one
    marker per model in ``similarity`` (``{model: {lang: value}}``), languages labelled; Pearson r
    of each model in the legend, the full model's (or the first model's) in the title."""
    models = list(similarity)
    markers = {"full": "o", "subnetwork": "s", "base": "^", "random": "v"}
    fig = Figure(figsize=(5.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    rs: dict[str, float | None] = {}
    for k, model in enumerate(models):
        langs = [lang for lang in distance if lang in similarity[model]]
        x = [distance[lang] for lang in langs]
        y = [similarity[model][lang] for lang in langs]
        rs[model] = pearson_r(x, y)
        ax.scatter(x, as_array(y), marker=markers.get(model, "D"), s=36, zorder=3,
                   label=f"{MODEL_LABELS.get(model, model)} ({_fmt_r(rs[model])})", color=f"C{k}")
        for lang, xi, yi in zip(langs, x, y, strict=True):
            if yi is not None and math.isfinite(yi):
                ax.annotate(lang, (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=8)
    main = "full" if "full" in rs else (models[0] if models else None)
    r_main = _fmt_r(rs.get(main)) if main else "r undefined"
    ax.set_xlabel(f"syntactic distance to {reference}" + (f" ({method})" if method else ""))
    ax.set_ylabel(f"{measure} with {reference} ({where})")
    _title(ax, f"{measure} vs syntactic distance to {reference}: Pearson {r_main}"
           + (f" ({MODEL_LABELS.get(main, main)})" if main and len(models) > 1 else ""))
    ax.grid(alpha=0.25)
    ax.margins(0.12)
    ax.legend(loc="best")
    return fig


def token_overlap_bars(
    overlap: Mapping[str, float], *, reference: str, n: int | None = None, colors: Mapping[str, str] | None = None,
) -> Figure:
    """Bars per language: mean share of a sentence's token types that also occur in ``reference``'s
    translation of the sentence (special tokens excluded)."""
    langs = list(overlap)
    cols = _colors(langs, colors)
    fig = Figure(figsize=(max(4.6, 0.7 * len(langs) + 2.2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(langs, as_array([overlap[lang] for lang in langs]), color=[cols[lang] for lang in langs])
    _bar_labels(ax, bars, ".2f")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("language")
    ax.set_ylabel(f"token overlap with {reference}")
    _title(ax, f"Token overlap with {reference}" + (f" (mean over {n} parallel sentences)" if n else ""))
    return fig
