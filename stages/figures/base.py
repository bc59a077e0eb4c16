"""What every figure shares: the style and saving, colours and markers per language, titles and legends
that fit, heatmap cells, interval lines, and the Pearson r of the scatter plots.

Nothing here reads artifacts (that is :mod:`stages.report_inputs`'s job) and nothing uses ``pyplot``: every
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

DPI = 150
FORMATS = ("png", "pdf")
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


def colors_of(languages: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    base = language_colors(languages)
    return {lang: (colors or {}).get(lang, base[lang]) for lang in languages}


def study_order(languages: Iterable[str], colors: Mapping[str, str] | None = None) -> list[str]:
    """``languages`` (once each) in the order of ``colors`` (the study's order); the others after
    them, in their own order."""
    rank = {lang: i for i, lang in enumerate(colors or {})}
    return sorted(dict.fromkeys(languages), key=lambda lang: rank.get(lang, len(rank)))


def markers_of(languages: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    """One marker per language, by its place in the study's order (so the same across figures)."""
    ref = list(colors or {}) + [lang for lang in languages if lang not in (colors or {})]
    return {lang: MARKERS[ref.index(lang) % len(MARKERS)] for lang in languages}


def legend_in_order(handles: Sequence[Any], labels: Sequence[str], order: Sequence[str]) -> tuple[list[Any], list[str]]:
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


def mark_center(colorbar: Any, center: float) -> None:
    """A thin line on a colour bar at ``center`` when it lies inside the bar."""
    lo, hi = colorbar.norm.vmin, colorbar.norm.vmax
    if lo < center < hi:
        colorbar.ax.axhline(center, color="black", lw=0.8)


def bounds(intervals: Sequence[Any] | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) arrays of ``n`` intervals given as [lo, hi] pairs; NaN where one is missing."""
    lo, hi = np.full(n, math.nan), np.full(n, math.nan)
    for i, iv in enumerate(list(intervals or [])[:n]):
        if iv is not None and len(iv) == 2 and iv[0] is not None and iv[1] is not None:
            lo[i], hi[i] = float(iv[0]), float(iv[1])
    return lo, hi


def interval_lines(ax: Axes, x: Sequence[float] | np.ndarray, intervals: Sequence[Any], color: Any = "black") -> None:
    """A thin vertical line from lower to upper bound at each ``x`` whose interval is known."""
    lo, hi = bounds(intervals, len(x))
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.vlines(np.asarray(x, dtype=float)[ok], lo[ok], hi[ok], colors=color, lw=1.2, zorder=4,
                  label="_nolegend_")


def coinciding_labels(series: Mapping[str, Sequence[float]]) -> dict[str, str]:
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


def dodge(n: int, span: float = 0.3) -> np.ndarray:
    """Sideways offsets for ``n`` series drawn at the same x (centred on 0, ``span`` wide)."""
    return np.linspace(-span / 2, span / 2, n) if n > 1 else np.zeros(n)


def wrap_title(text: str, width_in: float, fontsize: float = 10.0) -> str:
    """``text`` wrapped so that each line fits in ``width_in`` inches (titles wider than the figure
    are clipped: constrained layout cannot make room for them)."""
    chars = max(20, int(0.88 * width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def axes_width(ax: Axes, reserve: float = 0.0) -> float:
    """About how wide (inches) ``ax`` will be: its share of the figure's width, less room for the
    y-axis labels and ``reserve`` (a colour bar beside it)."""
    fig = ax.get_figure(root=True)
    width = float(fig.get_size_inches()[0]) if isinstance(fig, Figure) else 6.0
    spec = ax.get_subplotspec()
    share = 1.0 if spec is None else (spec.colspan.stop - spec.colspan.start) / spec.get_gridspec().ncols
    return max(1.5, width * share - 0.6 - reserve)


def axes_title(ax: Axes, text: str, reserve: float = 0.0) -> None:
    """An axes title wrapped to the axes' width (a title centred over an axes that is wider than the
    axes can reach past the figure's edge and be clipped); ``reserve``: inches a colour bar takes."""
    ax.set_title(wrap_title(text, axes_width(ax, reserve), 10.0))


def legend_ncols(labels: Sequence[str], width_in: float, fontsize: float = 8.0) -> int:
    """The most legend columns (up to one per entry) whose widest entries fit in ``width_in``."""
    for ncols in range(len(labels), 1, -1):
        widest = max(len(label) for label in labels) * 0.6 * fontsize / 72 + 0.6
        if ncols * widest <= width_in * 0.95:
            return ncols
    return 1


def figure_title(fig: Figure, text: str) -> None:
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


def finite_pairs(x: Sequence[float], y: Sequence[float | None]) -> int:
    return sum(1 for a, b in zip(x, y, strict=True) if b is not None and math.isfinite(a) and math.isfinite(b))


def _text_color(rgba: Sequence[float]) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _cell_text(v: float, fmt: str, spread: float = math.nan, mark: bool = False) -> str:
    text = format(v, fmt) + ("*" if mark else "")
    return f"{text}\n±{format(spread, fmt.lstrip('+'))}" if math.isfinite(spread) else text


def annotate_cells(ax: Axes, image: Any, values: np.ndarray, fmt: str, *, spread: np.ndarray | None = None,
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


def draw_heatmap(ax: Axes, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *,
             cmap: str | mcolors.Colormap, norm: mcolors.Normalize, fmt: str | None) -> Any:
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels=list(cols))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    return image


def annotates(rows: Sequence[str], cols: Sequence[str]) -> bool:
    return max(len(rows), len(cols)) <= 16


def finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def bar_labels(ax: Axes, bars: Any, fmt: str, size: float = 7.5) -> None:
    labels = [format(h, fmt) if math.isfinite(h) else "n/a" for h in (b.get_height() for b in bars)]
    ax.bar_label(bars, labels=labels, padding=2, fontsize=size)


def split_text(split: str | None) -> str:
    return f", {split} split" if split else ""
