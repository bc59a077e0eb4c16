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
- one colour and one marker per language across figures when the caller passes ``colors``, whose
  order is the study's order: legends list languages in that order, whatever order the data come in;
- diverging colour bars (:func:`diverging_scale`) span exactly the data's range (and the centre),
  linearly, with the neutral colour at the centre: no half of a bar is spent on an empty interval;
- intervals (bootstrap or other) are drawn as thin vertical lines or shaded bands, floors as dotted
  lines or grey bands; a figure called without them draws the values alone.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from statistics import NormalDist
from typing import Any, cast

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

DPI = 150
FORMATS = ("png", "pdf")
FULL = "full"
RANDOM_ROW = "random"  # cross-evaluation rows of size-matched random masks start with this word
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "*", "p")
Interval = tuple[float, float]

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
    with matplotlib.rc_context(cast(Any, STYLE)):
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


def study_order(languages: Iterable[str], colors: Mapping[str, str] | None = None) -> list[str]:
    """``languages`` (once each) in the order of ``colors`` (the study's order); the others after
    them, in their own order."""
    rank = {lang: i for i, lang in enumerate(colors or {})}
    return sorted(dict.fromkeys(languages), key=lambda lang: rank.get(lang, len(rank)))


def _markers(languages: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    """One marker per language, by its place in the study's order (so the same across figures)."""
    ref = list(colors or {}) + [lang for lang in languages if lang not in (colors or {})]
    return {lang: MARKERS[ref.index(lang) % len(MARKERS)] for lang in languages}


def _legend_in_order(handles: Sequence[Any], labels: Sequence[str], order: Sequence[str]) -> tuple[list[Any], list[str]]:
    """Legend entries with the languages first, in ``order``; the other entries after, as they came."""
    rank = {lang: i for i, lang in enumerate(order)}
    pairs = sorted(zip(handles, labels, strict=True), key=lambda hl: rank.get(hl[1], len(rank)))
    return [h for h, _ in pairs], [lbl for _, lbl in pairs]


def diverging_scale(
    values: Any, *, center: float = 1.0, cmap: str = "RdBu_r"
) -> tuple[mcolors.Normalize, mcolors.Colormap]:
    """A linear colour scale over exactly [min(data, center), max(data, center)] whose colour at
    ``center`` is the diverging map's neutral middle, and equal distances from the centre get equally
    strong colours on either side (the map is cut to the part the data use)."""
    arr = np.asarray(values, dtype=float)
    finite = arr[np.isfinite(arr)]
    lo = min(float(finite.min()), center) if finite.size else center
    hi = max(float(finite.max()), center) if finite.size else center
    half = max(center - lo, hi - center)
    if half == 0:
        half = max(abs(center) * 0.01, 0.01)
        lo, hi = center - half, center + half
    start, stop = 0.5 - (center - lo) / (2 * half), 0.5 + (hi - center) / (2 * half)
    base = matplotlib.colormaps[cmap]
    part = mcolors.ListedColormap(base(np.linspace(start, stop, 256)), name=f"{cmap}_{start:.3f}_{stop:.3f}")
    return mcolors.Normalize(vmin=lo, vmax=hi), part


def _mark_center(colorbar: Any, center: float) -> None:
    """A thin line on a colour bar at ``center`` when it lies inside the bar."""
    lo, hi = colorbar.norm.vmin, colorbar.norm.vmax
    if lo < center < hi:
        colorbar.ax.axhline(center, color="black", lw=0.8)


def _bounds(intervals: Sequence[Any] | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) arrays of ``n`` intervals given as [lo, hi] pairs; NaN where one is missing."""
    lo, hi = np.full(n, math.nan), np.full(n, math.nan)
    for i, iv in enumerate(list(intervals or [])[:n]):
        if iv is not None and len(iv) == 2 and iv[0] is not None and iv[1] is not None:
            lo[i], hi[i] = float(iv[0]), float(iv[1])
    return lo, hi


def _interval_lines(ax: Axes, x: Sequence[float] | np.ndarray, intervals: Sequence[Any], color: Any = "black") -> None:
    """A thin vertical line from lower to upper bound at each ``x`` whose interval is known."""
    lo, hi = _bounds(intervals, len(x))
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.vlines(np.asarray(x, dtype=float)[ok], lo[ok], hi[ok], colors=color, lw=1.2, zorder=4,
                  label="_nolegend_")


def _coinciding_labels(series: Mapping[str, Sequence[float]]) -> dict[str, str]:
    """Each name as its legend label, ``"<name> (same as <first>)"`` for a series identical to an
    earlier one (drawn on top of each other, the later one would hide the earlier)."""
    labels: dict[str, str] = {}
    seen: list[tuple[str, np.ndarray]] = []
    for name, values in series.items():
        arr = as_array(values)
        twin = next((other for other, a in seen if a.shape == arr.shape and np.allclose(a, arr, equal_nan=True)), None)
        labels[name] = name if twin is None else f"{name} (same as {twin})"
        seen.append((name, arr))
    return labels


def _dodge(n: int, span: float = 0.3) -> np.ndarray:
    """Sideways offsets for ``n`` series drawn at the same x (centred on 0, ``span`` wide)."""
    return np.linspace(-span / 2, span / 2, n) if n > 1 else np.zeros(n)


def wrap_title(text: str, width_in: float, fontsize: float = 10.0) -> str:
    """``text`` wrapped so that each line fits in ``width_in`` inches (titles wider than the figure
    are clipped: constrained layout cannot make room for them)."""
    chars = max(20, int(0.88 * width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def _axes_width(ax: Axes, reserve: float = 0.0) -> float:
    """About how wide (inches) ``ax`` will be: its share of the figure's width, less room for the
    y-axis labels and ``reserve`` (a colour bar beside it)."""
    fig = ax.get_figure(root=True)
    width = float(fig.get_size_inches()[0]) if isinstance(fig, Figure) else 6.0
    spec = ax.get_subplotspec()
    share = 1.0 if spec is None else (spec.colspan.stop - spec.colspan.start) / spec.get_gridspec().ncols
    return max(1.5, width * share - 0.6 - reserve)


def _title(ax: Axes, text: str, reserve: float = 0.0) -> None:
    """An axes title wrapped to the axes' width (a title centred over an axes that is wider than the
    axes can reach past the figure's edge and be clipped); ``reserve``: inches a colour bar takes."""
    ax.set_title(wrap_title(text, _axes_width(ax, reserve), 10.0))


def _legend_ncols(labels: Sequence[str], width_in: float, fontsize: float = 8.0) -> int:
    """The most legend columns (up to one per entry) whose widest entries fit in ``width_in``."""
    for ncols in range(len(labels), 1, -1):
        widest = max(len(label) for label in labels) * 0.6 * fontsize / 72 + 0.6
        if ncols * widest <= width_in * 0.95:
            return ncols
    return 1


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


def pearson_ci(r: float | None, n: int, confidence: float = 0.95) -> Interval | None:
    """Confidence interval of a Pearson r from ``n`` pairs (Fisher z transform: atanh(r) is about
    normal with standard error 1/sqrt(n - 3)); None below 4 pairs or without r."""
    if r is None or not math.isfinite(r) or n < 4:
        return None
    if abs(r) >= 1.0:
        return (r, r)
    q = NormalDist().inv_cdf(0.5 + confidence / 2)
    z, se = math.atanh(r), 1.0 / math.sqrt(n - 3)
    return (math.tanh(z - q * se), math.tanh(z + q * se))


def format_r(r: float | None, n: int, confidence: float = 0.95) -> str:
    """``"r = -0.52, 95% CI [-0.95, 0.60], n = 6"``."""
    ci = pearson_ci(r, n, confidence)
    ci_text = f", {confidence:.0%} CI [{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None else ""
    return f"{_fmt_r(r)}{ci_text}, n = {n}"


def _finite_pairs(x: Sequence[float], y: Sequence[float | None]) -> int:
    return sum(1 for a, b in zip(x, y, strict=True) if b is not None and math.isfinite(a) and math.isfinite(b))


def _text_color(rgba: Sequence[float]) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _cell_text(v: float, fmt: str, spread: float = math.nan, mark: bool = False) -> str:
    text = format(v, fmt) + ("*" if mark else "")
    return f"{text}\n±{format(spread, fmt.lstrip('+'))}" if math.isfinite(spread) else text


def _annotate_cells(ax: Axes, image: Any, values: np.ndarray, fmt: str, *, spread: np.ndarray | None = None,
                    marks: np.ndarray | None = None, missing: str = "n/a") -> None:
    """Write each cell's value into a heatmap (``missing`` for NaN), black or white by background;
    ``spread`` (± half-widths, NaN for none) goes on a second line, ``marks`` add a ``*``."""
    n_rows, n_cols = values.shape
    size = 8 if max(n_rows, n_cols) <= 9 else 6.5
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if not np.isfinite(v):
                ax.text(j, i, missing, ha="center", va="center", fontsize=size, color="0.3")
                continue
            color = _text_color(image.cmap(image.norm(v)))
            text = _cell_text(v, fmt, math.nan if spread is None else float(spread[i, j]),
                              bool(marks is not None and marks[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=size if "\n" not in text else size - 1, color=color)


def _heatmap(ax: Axes, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *,
             cmap: str | mcolors.Colormap, norm: mcolors.Normalize, fmt: str | None) -> Any:
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels=list(cols))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    return image


def _annotates(rows: Sequence[str], cols: Sequence[str]) -> bool:
    return max(len(rows), len(cols)) <= 16


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


def _split_text(split: str | None) -> str:
    return f", {split} split" if split else ""


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
    _interval_lines(ax, x - w / 2, [(intervals_before or {}).get(lang) for lang in languages])
    _interval_lines(ax, x + w / 2, [(intervals_after or {}).get(lang) for lang in languages])
    _bar_labels(ax, b1, ".2f", 7)
    _bar_labels(ax, b2, ".2f", 7)
    handles: list[Any] = [b1, b2]
    if intervals_before or intervals_after:
        handles.append(Line2D([], [], color="black", lw=1.2, label="interval"))
    width = float(fig.get_size_inches()[0])
    fig.legend(handles=handles, loc="outside lower center", ncols=_legend_ncols([h.get_label() for h in handles], width))
    ax.set_xticks(x, labels=list(languages))
    ax.set_xlabel("eval language (test set)")
    ax.set_ylabel(f"MLM perplexity ({split} split)" if split else "MLM perplexity")
    _title(ax, "Per-language perplexity before and after MLM fine-tuning (deterministic masks)")
    ax.margins(y=0.12)
    return fig


def training_curve(
    history: Sequence[Mapping[str, Any]], languages: Sequence[str], best_step: int | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Eval perplexity of every language at each evaluation step of fine-tuning; best step marked."""
    langs = study_order(languages, colors)
    cols, marks = _colors(langs, colors), _markers(langs, colors)
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
    _title(ax, "Eval perplexity per language during fine-tuning")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


# --------------------------------------------------------------------------------------------------
# Subnetworks: cross-evaluation, masks, pruning
# --------------------------------------------------------------------------------------------------


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
        norm, cmap = mcolors.Normalize(*_finite_range(arr)), matplotlib.colormaps["viridis"]
        fmt, label, title = ".2f", "perplexity", "Cross-language perplexity of the subnetworks"
    image = _heatmap(ax, arr, rows, cols, cmap=cmap, norm=norm, fmt=fmt)
    if _annotates(rows, cols):
        _annotate_cells(ax, image, arr, fmt, spread=None if spread is None else as_array(spread))
    for i, r in enumerate(rows):
        if r in cols:
            ax.add_patch(Rectangle((cols.index(r) - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.6))
    for y in _row_breaks(rows):
        ax.axhline(y, color="white", lw=3)
    ax.set_xlabel(f"eval language (test set{_split_text(split)})")
    ax.set_ylabel("subnetwork (mask pruned on language)")
    _title(ax, f"{title}\nrows: subnetwork, columns: eval language; outlined: own language", reserve=1.0)
    bar = fig.colorbar(image, ax=ax, label=label, shrink=0.9)
    if relative:
        _mark_center(bar, 1.0)
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
    image = _heatmap(axes[0], arr, labels, labels, cmap="viridis", norm=norm, fmt=".2f")
    if _annotates(labels, labels):
        _annotate_cells(axes[0], image, arr, ".2f")
    mean = float(np.nanmean(off)) if n > 1 else math.nan
    expected = f"; chance {float(np.nanmean(as_array(chance)[off_diag])):.2f}" if chance is not None and n > 1 else ""
    axes[0].set_xlabel("language")
    axes[0].set_ylabel("language")
    _title(axes[0], f"Jaccard index of kept heads (mean over pairs {mean:.2f}{expected})", reserve=1.0)
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
    image = _heatmap(ax, diff, labels, labels, cmap=cmap, norm=norm, fmt="+.2f")
    marks = np.zeros_like(diff, dtype=bool)
    if interval is not None:
        lo = np.array([[_bounds([c], 1)[0][0] for c in row] for row in interval])
        hi = np.array([[_bounds([c], 1)[1][0] for c in row] for row in interval])
        marks = (observed < lo) | (observed > hi)
    if _annotates(labels, labels):
        _annotate_cells(ax, image, diff, "+.2f", marks=marks, missing="")
    ax.set_xlabel("language")
    _title(ax, "Observed minus chance (random masks of the same sizes)"
           + ("; *: outside the chance interval" if interval is not None else ""), reserve=1.0)
    bar = fig.colorbar(image, ax=ax, label="Jaccard − chance Jaccard", shrink=0.9)
    _mark_center(bar, 0.0)


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
    cols, marks = _colors(langs, colors), _markers(langs, colors)
    labels = _coinciding_labels({lang: by_language[lang] for lang in langs})
    x = np.arange(1, len(mean) + 1)
    fig = Figure(figsize=(max(5.0, 0.35 * len(mean) + 3.0), 3.8), layout="constrained")
    ax = fig.add_subplot()
    for lang, dx in zip(langs, _dodge(len(langs)), strict=True):
        ax.plot(x + dx, as_array(by_language[lang]), marker=marks[lang], ms=4, lw=1, alpha=0.85, color=cols[lang],
                label=labels[lang])
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
    threshold factor (perplexity may grow to ``P0 * threshold``). Languages in the study's order.
    """
    langs = study_order(trajectories, colors)
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
            _annotate_cells(ax, image, arr, ".2f")
        _title(ax, f"{lang} (diagonal mean {diag:.2f})")
        ax.set_xticks(ticks, labels=labels, fontsize=7)
        ax.set_yticks(ticks, labels=labels, fontsize=7)
        ax.set_xlabel(f"{lang} subnetwork layer")
        ax.set_ylabel("full model layer")
    for ax in axes[len(langs):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(langs)]), label=measure, shrink=0.85)
    _suptitle(fig, f"{measure[:1].upper()}{measure[1:]}, full model layer x subnetwork layer (0 = embeddings)")
    return fig


LENGTH_FLOOR = "length_matched"
SHUFFLED_FLOOR = "shuffled"
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
    models = [m for m in ("full", "subnetwork", *CONTROL_MODELS) if m in pairwise]
    models += [m for m in pairwise if m not in models]
    if not models:
        raise ValueError("no similarity curves to draw")
    langs = study_order((lang for m in models for lang in pairwise[m]), colors)
    style = {"colors": _colors(langs, colors), "markers": _markers(langs, colors)}
    ncols = min(2, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig = Figure(figsize=(5.0 * ncols + 1.2, 3.4 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    x = np.asarray(layers)
    control_mean = _mean_curve(pairwise.get("random", {}))
    extra: dict[str, Any] = {}
    for ax, model in zip(axes, models, strict=False):
        dashed = model in CONTROL_MODELS
        curves = {lang: pairwise[model][lang] for lang in langs if lang in pairwise[model]}
        _draw_curves(ax, x, curves, style, dashed, (spreads or {}).get(model) or {})
        extra |= _draw_floors(ax, x, (floors or {}).get(model) or {}, style["colors"])
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
    handles, labels = _legend_in_order(*_unique_legend(axes[: len(models)]), langs)
    fig.legend(handles + list(extra.values()), labels + list(extra), loc="outside right center")
    _suptitle(fig, f"Layer-by-layer {measure}: {reference} vs each language (same sentences)")
    return fig


def _draw_curves(ax: Axes, x: np.ndarray, curves: Mapping[str, Sequence[float]], style: Mapping[str, Any],
                 dashed: bool, spreads: Mapping[str, Sequence[Any]]) -> None:
    for lang, values in curves.items():
        color = style["colors"][lang]
        if spreads.get(lang):
            lo, hi = _bounds(spreads[lang], len(x))
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
        _interval_lines(ax, x, [intervals.get(lang) for lang in langs])
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
    _title(ax, f"{measure} with {reference}: subnetworks minus full model ({where})")
    if handles:
        width = float(fig.get_size_inches()[0])
        fig.legend(handles=handles, loc="outside lower center", ncols=_legend_ncols([h.get_label() for h in handles], width))
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
    markers = {"full": "o", "subnetwork": "s", "base": "^", "random": "v"}
    fig = Figure(figsize=(5.8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    stats: dict[str, str] = {}
    for k, model in enumerate(models):
        langs = [lang for lang in distance if lang in similarity[model]]
        x = [distance[lang] for lang in langs]
        y = [similarity[model][lang] for lang in langs]
        stats[model] = format_r(pearson_r(x, as_array(y).tolist()), _finite_pairs(x, y), confidence)
        ax.scatter(x, as_array(y), marker=markers.get(model, "D"), s=36, zorder=3,
                   label=f"{MODEL_LABELS.get(model, model)} ({stats[model]})", color=f"C{k}")
        _interval_lines(ax, x, [((intervals or {}).get(model) or {}).get(lang) for lang in langs], color=f"C{k}")
        for lang, xi, yi in zip(langs, x, y, strict=True):
            if yi is not None and math.isfinite(yi):
                ax.annotate(lang, (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=8)
    main = "full" if "full" in stats else (models[0] if models else None)
    r_main = stats[main] if main else "r undefined"
    ax.set_xlabel(f"syntactic distance to {reference}" + (f" ({method})" if method else ""))
    ax.set_ylabel(f"{measure} with {reference} ({where})")
    _title(ax, f"{measure} vs syntactic distance to {reference}: Pearson {r_main}"
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
