"""The figure functions of :mod:`stages.figures` on plain data: what each Figure draws, where."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from stages import figures as F

LANGS = ["en", "de", "zh"]


def _ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_cross_eval_heatmap_orientation_and_marks():
    rows, cols = ["en", "de", "zh", "full"], ["en", "de", "zh"]
    values = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, None, 9.0], [1.5, 2.5, 3.5]]  # None = inf in cross_eval.json
    fig = F.cross_eval_heatmap(rows, cols, values)
    ax = fig.axes[0]
    assert _ticks(ax.get_yticklabels()) == rows and _ticks(ax.get_xticklabels()) == cols
    assert "subnetwork" in ax.get_ylabel() and "eval language" in ax.get_xlabel()
    image = ax.images[0].get_array()
    assert image[0, 2] == 3.0 and image[2, 0] == 7.0 and image.mask[2, 1]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts[(0, 2)] == "3.00" and texts[(2, 1)] == "n/a" and texts[(3, 0)] == "1.50"
    outlined = sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches)
    assert outlined == [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)]  # own language: (col, row)
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [2.5]  # separates the full model's row
    assert fig.axes[1].get_ylabel() == "perplexity"  # colorbar


def test_cross_eval_heatmap_non_square_and_relative():
    fig = F.cross_eval_heatmap(["de", "full"], ["en", "de", "zh"], [[1.2, 1.0, 0.9], [1, 1, 1]], relative=True)
    ax = fig.axes[0]
    assert _ticks(ax.get_yticklabels()) == ["de", "full"]
    assert [(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches] == [(1.0, 0.0)]
    image = ax.images[0]
    norm = image.norm
    assert norm(0.9) == pytest.approx(0.0) and norm(1.2) == pytest.approx(1.0)  # the bar spans the data
    np.testing.assert_allclose(image.cmap(norm(1.0)), F.matplotlib.colormaps["RdBu_r"](0.5), atol=0.02)  # 1: neutral
    assert "full model" in fig.axes[1].get_ylabel()
    with pytest.raises(ValueError, match="shape"):
        F.cross_eval_heatmap(["de"], ["en", "de"], [[1.0, 2.0, 3.0]])


def test_jaccard_heatmap():
    m = [[1, 0.75, 0.8], [0.75, 1, 0.9], [0.8, 0.9, 1]]
    ax = F.jaccard_heatmap(LANGS, m).axes[0]
    assert _ticks(ax.get_xticklabels()) == LANGS == _ticks(ax.get_yticklabels())
    assert "mean over pairs 0.82" in ax.get_title().replace("\n", " ")
    assert sorted(t.get_text() for t in ax.texts).count("1.00") == 3


def test_masked_per_layer_lines():
    by_lang = {"en": [0.0, 0.5, 0.25], "de": [0.25, 0.0, 0.0]}
    ax = F.masked_per_layer([0.125, 0.25, 0.125], by_lang).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"en", "de", "mean over languages"}
    np.testing.assert_allclose(lines["mean over languages"].get_ydata(), [0.125, 0.25, 0.125])
    np.testing.assert_array_equal(lines["mean over languages"].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(lines["en"].get_ydata(), by_lang["en"])
    assert lines["mean over languages"].get_linewidth() > lines["en"].get_linewidth()


def test_pruning_trajectories_mark_threshold_and_rejected_step():
    traj = {"en": [{"step": 0, "heads_kept": 8, "perplexity": 10.0, "accepted": True},
                   {"step": 1, "heads_kept": 7, "perplexity": 10.5, "accepted": True},
                   {"step": 2, "heads_kept": 6, "perplexity": 12.0, "accepted": False}]}
    fig = F.pruning_trajectories(traj, {"en": 1.1})
    ax_abs, ax_rel = fig.axes[:2]
    assert ax_abs.xaxis_inverted() and ax_rel.xaxis_inverted()
    rel = {line.get_label(): line for line in ax_rel.get_lines()}
    np.testing.assert_allclose(rel["threshold (x1.1)"].get_ydata(), [1.1, 1.1])
    np.testing.assert_allclose(rel["en"].get_ydata(), [1.0, 1.05])  # the accepted steps
    crosses = [ln for ln in ax_abs.get_lines() if ln.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_xdata()[0] == 6 and crosses[0].get_ydata()[0] == 12.0
    assert any(np.allclose(ln.get_ydata(), [11.0, 11.0]) for ln in ax_abs.get_lines())  # P0 * threshold


def test_cka_layer_heatmaps_grid():
    mats = {lang: np.eye(3) * 0.5 + 0.25 for lang in ["en", "de", "zh", "ar", "hi"]}
    fig = F.cka_layer_heatmaps(mats, [0, 1, 2], ncols=4)
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 5 and sum(not a.get_visible() for a in fig.axes) == 3  # 2 x 4 grid
    assert panels[0].get_title().startswith("en (diagonal mean 0.75)")
    assert panels[0].get_ylabel() == "full model layer" and panels[0].get_xlabel() == "en subnetwork layer"
    assert panels[0].images[0].norm.vmin == 0 and panels[0].images[0].norm.vmax == 1
    assert any(a.get_ylabel() == "linear CKA" for a in fig.axes)
    with pytest.raises(ValueError):
        F.cka_layer_heatmaps({}, [0])


def test_similarity_curves_panels_and_controls():
    layers = [0, 1, 2]
    pw = {"random": {"de": [0.1, 0.1, 0.1], "zh": [0.3, 0.3, 0.3]}, "full": {"de": [0.5, 0.6, 0.7]},
          "subnetwork": {"de": [0.55, 0.6, 0.75]}}
    fig = F.similarity_curves(layers, "en", pw, measure="cka_debiased")
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["full fine-tuned model", "language subnetworks",
                                             "random-init model (control)"]
    full = {ln.get_label(): ln for ln in axes[0].get_lines()}
    np.testing.assert_allclose(full["random-init control (mean)"].get_ydata(), [0.2, 0.2, 0.2])
    assert full["de"].get_linestyle() == "-"
    assert {ln.get_linestyle() for ln in axes[2].get_lines()} == {"--"}
    assert "cka_debiased" in axes[0].get_ylabel() and "en" in fig.get_suptitle()


def test_similarity_differences_and_scatter():
    ax = F.similarity_differences({"de": 0.02, "zh": -0.03}, reference="en", where="layer 8").axes[0]
    assert [b.get_height() for b in ax.patches] == [0.02, -0.03]
    assert ax.patches[0].get_facecolor() != ax.patches[1].get_facecolor()
    assert "layer 8" in ax.get_title().replace("\n", " ")

    dist = {"de": 0.3, "ru": 0.5, "zh": 0.7}
    sim = {"full": {"de": 0.8, "ru": 0.6, "zh": 0.4}, "subnetwork": {"de": 0.7, "ru": 0.7, "zh": 0.5}}
    ax = F.similarity_vs_distance(dist, sim, reference="en").axes[0]
    assert "Pearson r = -1.00" in ax.get_title().replace("\n", " ")
    assert sorted(t.get_text() for t in ax.texts) == sorted(["de", "ru", "zh"] * 2)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[0.3, 0.8], [0.5, 0.6], [0.7, 0.4]])
    assert F.pearson_r([0.3, 0.5, 0.7], [0.7, 0.7, 0.5]) == pytest.approx(-0.8660254)
    assert F.pearson_r([1, 2], [1, 2]) is None and F.pearson_r([1, 2, 3], [4, 4, 4]) is None
    assert F.pearson_r([1, 2, 3, float("nan")], [1, 2, 3, 0]) == pytest.approx(1.0)


def test_token_overlap_and_perplexity_bars():
    ax = F.token_overlap_bars({"de": 0.3, "zh": 0.05}, reference="en", n=100).axes[0]
    assert [b.get_height() for b in ax.patches] == [0.3, 0.05]
    assert "100" in ax.get_title().replace("\n", " ") and ax.get_ylim() == (0, 1.05)
    fig = F.perplexity_before_after(["en", "de"], {"en": 5.6, "de": 5.3}, {"en": 4.1, "de": 3.9})
    ax = fig.axes[0]
    heights = [round(b.get_height(), 2) for b in ax.patches]
    assert heights == [5.6, 5.3, 4.1, 3.9]
    assert [t.get_text() for t in fig.legends[0].get_texts()][0].startswith("before")


def test_training_curve_marks_best_step():
    hist = [{"step": s, "languages": {"en": {"perplexity": p}}} for s, p in ((0, 9.0), (10, 6.0), (20, 6.5))]
    ax = F.training_curve(hist, ["en"], best_step=10).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_allclose(lines["en"].get_ydata(), [9.0, 6.0, 6.5])
    assert list(lines["best checkpoint (step 10)"].get_xdata()) == [10, 10]


def test_save_writes_deterministic_png_and_pdf(tmp_path):
    def draw() -> Figure:
        return F.jaccard_heatmap(["a", "b"], [[1, 0.5], [0.5, 1]])

    files = F.save(draw(), tmp_path / "a", "jac")
    F.save(draw(), tmp_path / "b", "jac")
    assert files == ["jac.png", "jac.pdf"]
    for name in files:
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "jac.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "a" / "jac.pdf").read_bytes().startswith(b"%PDF")


def test_titles_are_wrapped_to_the_figure_width():
    text = "word " * 40
    lines = F.wrap_title(text, 4.0).split("\n")
    assert len(lines) > 1 and all(len(line) <= int(0.88 * 4.0 * 72 / 6.0) for line in lines)
    assert F.wrap_title("fine-tuning " * 3, 1.0).count("fine-tuning") == 3  # never split at hyphens
    assert F.language_colors(["a", "b"]) == {"a": "#1f77b4", "b": "#ff7f0e"}


# --------------------------------------------------------------------------------------------------
# Review fixes: diverging colour bars, coinciding lines, study order, floors, spreads, chance, r's CI
# --------------------------------------------------------------------------------------------------

STUDY = ["en", "es", "ru", "de", "zh", "ar", "hi"]  # the order languages are declared in (legend order)


def _inside_canvas(fig: Figure) -> bool:
    """Every drawn artist (titles, tick and axis labels, legends, colour bars) lies inside the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    w, h = fig.get_size_inches()
    return box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01


def _legend_labels(fig: Figure) -> list[str]:
    legends = list(fig.legends) + [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def test_diverging_scale_spans_the_data_and_puts_the_neutral_colour_at_the_centre():
    neutral = np.array(F.matplotlib.colormaps["RdBu_r"](0.5))
    norm, cmap = F.diverging_scale(np.array([1.0, 1.02, 1.3, np.nan]), center=1.0)
    assert (norm.vmin, norm.vmax) == (1.0, 1.3)  # not half the bar on [0.999, 1]
    np.testing.assert_allclose(cmap(norm(1.0)), neutral, atol=0.02)
    norm, cmap = F.diverging_scale(np.array([0.8, 1.1]), center=1.0)
    assert (norm.vmin, norm.vmax) == (0.8, 1.1)
    np.testing.assert_allclose(cmap(norm(1.0)), neutral, atol=0.02)
    # the same distance from the centre has the same strength on either side (linear bar, mirrored colours)
    below, above = np.array(cmap(norm(0.9))[:3]), np.array(cmap(norm(1.1))[:3])
    assert abs(below.sum() - above.sum()) < 0.15
    norm, _ = F.diverging_scale(np.array([1.0, 1.0]), center=1.0)
    assert norm.vmin < 1.0 < norm.vmax


def test_relative_cross_eval_bar_is_linear_over_the_data_range():
    fig = F.cross_eval_heatmap(["de", "full"], ["en", "de"], [[1.2, 1.05], [1.0, 1.0]], relative=True)
    norm = fig.axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == (1.0, 1.2) and norm(1.1) == pytest.approx(0.5)
    fig = F.cross_eval_heatmap(["de"], ["en", "de"], [[1.2, 0.9]], relative=True,
                               baseline="size-matched random masks")
    assert "size-matched random masks" in fig.axes[1].get_ylabel()
    assert "size-matched random masks" in fig.axes[0].get_title().replace("\n", " ")
    assert _inside_canvas(fig)  # the long colour-bar label too


def test_cross_eval_heatmap_random_rows_with_spread_and_split():
    rows = ["en", "de", "full", "random (en size)", "random (de size)"]
    values = [[5.0, 9.0], [8.0, 4.0], [4.8, 3.9], [5.5, 9.5], [8.5, 4.4]]
    spread = [[None, None], [None, None], [None, None], [0.2, 0.3], [0.1, 0.4]]
    fig = F.cross_eval_heatmap(rows, ["en", "de"], values, spread=spread, split="report")
    ax = fig.axes[0]
    assert sorted(line.get_ydata()[0] for line in ax.get_lines()) == [1.5, 2.5]  # above full, above random
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts[(3, 1)] == "9.50\n±0.30" and texts[(0, 0)] == "5.00"
    assert "report split" in ax.get_xlabel()
    assert _inside_canvas(fig)


def test_masked_per_layer_keeps_coinciding_lines_visible_in_study_order():
    by_lang = {"ar": [0.5, 0.0, 0.25], "de": [0.5, 0.0, 0.25], "en": [0.0, 0.5, 0.25]}  # ar = de
    colors = F.language_colors(["en", "de", "ar"])
    fig = F.masked_per_layer([1 / 3, 1 / 6, 0.25], by_lang, colors=colors)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert _legend_labels(fig) == ["en", "de", "ar (same as de)", "mean over languages"]
    ar, de = lines["ar (same as de)"], lines["de"]
    np.testing.assert_allclose(ar.get_ydata(), de.get_ydata())
    assert not np.allclose(ar.get_xdata(), de.get_xdata())  # dodged sideways
    assert np.all(np.abs(ar.get_xdata() - [1, 2, 3]) < 0.3)
    assert ar.get_marker() != de.get_marker()


def test_training_curve_and_trajectories_legends_follow_study_order():
    colors = F.language_colors(STUDY)
    hist = [{"step": s, "languages": {k: {"perplexity": 5.0 + i} for i, k in enumerate(sorted(STUDY))}}
            for s in (0, 10)]
    fig = F.training_curve(hist, sorted(STUDY), best_step=10, colors=colors)
    assert _legend_labels(fig)[:7] == STUDY
    traj = {k: [{"step": 0, "heads_kept": 8, "perplexity": 10.0}, {"step": 1, "heads_kept": 7, "perplexity": 10.5}]
            for k in sorted(STUDY)}
    assert _legend_labels(F.pruning_trajectories(traj, {}, colors=colors))[:7] == STUDY


def test_similarity_curves_draw_floors_spreads_in_study_order():
    layers = [0, 1, 2]
    colors = F.language_colors(["en", "es", "de", "zh"])
    pw = {"full": {"zh": [0.3, 0.4, 0.5], "de": [0.5, 0.6, 0.7]}, "subnetwork": {"zh": [0.35, 0.4, 0.5]}}
    floors = {"full": {"length_matched": {"zh": [0.2, 0.25, 0.3], "de": [0.1, 0.1, 0.1]},
                       "shuffled": {"zh": [0.0, 0.01, 0.0], "de": [0.02, 0.0, 0.01]}}}
    spreads = {"full": {"zh": [[0.28, 0.32], [0.38, 0.42], [0.47, 0.53]]}}
    fig = F.similarity_curves(layers, "en", pw, measure="debiased CKA", colors=colors, floors=floors,
                              spreads=spreads)
    ax = fig.axes[0]
    labels = _legend_labels(fig)
    assert labels[:2] == ["de", "zh"]
    assert any("length-matched floor" in x for x in labels) and any("shuffled" in x for x in labels)
    dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert sorted(tuple(np.round(ln.get_ydata(), 3)) for ln in dotted) == [(0.1, 0.1, 0.1), (0.2, 0.25, 0.3)]
    bands = [c for c in ax.collections if c.get_paths()]
    assert len(bands) == 2  # the zh bootstrap band and the shuffled-floor band
    band = next(c for c in bands if np.isclose(c.get_paths()[0].vertices[:, 1].max(), 0.53))
    assert np.isclose(band.get_paths()[0].vertices[:, 1].min(), 0.28)
    markers = {ln.get_label(): ln.get_marker() for ln in ax.get_lines() if ln.get_label() in ("de", "zh")}
    assert markers["de"] != markers["zh"]
    assert _inside_canvas(fig)
    plain = F.similarity_curves(layers, "en", pw, measure="debiased CKA")  # older data: no floors, no spread
    assert not any("floor" in x for x in _legend_labels(plain))


def test_similarity_differences_show_intervals_and_the_floor_difference():
    fig = F.similarity_differences({"de": 0.02, "zh": -0.03}, reference="en", measure="debiased CKA",
                                   intervals={"de": (0.01, 0.04), "zh": (-0.05, 0.01)},
                                   floor_differences={"de": 0.005, "zh": -0.01})
    ax = fig.axes[0]
    segments = [s for c in ax.collections for s in c.get_segments()]
    spans = sorted((round(s[:, 1].min(), 3), round(s[:, 1].max(), 3)) for s in segments)
    assert spans == [(-0.05, 0.01), (0.01, 0.04)]
    floor = next(ln for ln in ax.get_lines() if "floor" in ln.get_label())
    np.testing.assert_allclose(floor.get_ydata(), [0.005, -0.01])
    assert _inside_canvas(fig)
    assert "approximate interval" in _legend_labels(fig)  # the default: an interval of unknown kind


def test_similarity_differences_name_the_kind_of_interval():
    fig = F.similarity_differences({"de": 0.02}, reference="en", intervals={"de": (0.015, 0.025)},
                                   interval_label="paired interval")
    assert "paired interval" in _legend_labels(fig) and "approximate interval" not in _legend_labels(fig)


def test_pearson_interval_and_the_scatter_reports_r_ci_and_n():
    lo, hi = F.pearson_ci(0.5, 10)
    assert lo == pytest.approx(-0.1888, abs=1e-3) and hi == pytest.approx(0.8593, abs=1e-3)
    assert F.pearson_ci(0.5, 3) is None and F.pearson_ci(None, 10) is None
    assert F.pearson_ci(-1.0, 5) == (-1.0, -1.0)
    dist = {"es": 0.2, "ru": 0.4, "de": 0.3, "zh": 0.7, "ar": 0.6}
    sim = {"full": {"es": 0.8, "ru": 0.5, "de": 0.75, "zh": 0.3, "ar": 0.45}}
    fig = F.similarity_vs_distance(dist, sim, reference="en", measure="debiased CKA",
                                   intervals={"full": {k: (v - 0.05, v + 0.05) for k, v in sim["full"].items()}})
    ax = fig.axes[0]
    title = ax.get_title().replace("\n", " ")
    r = F.pearson_r(list(dist.values()), list(sim["full"].values()))
    ci = F.pearson_ci(r, 5)
    assert f"r = {r:.2f}" in title and f"95% CI [{ci[0]:.2f}, {ci[1]:.2f}]" in title and "n = 5" in title
    assert "n = 5" in _legend_labels(fig)[0]
    segments = [s for c in ax.collections for s in getattr(c, "get_segments", lambda: [])()]
    assert len(segments) == 5  # a vertical interval per language
    assert _inside_canvas(fig)


def test_perplexity_bars_carry_intervals_and_the_split():
    fig = F.perplexity_before_after(["en", "de"], {"en": 5.6, "de": 5.3}, {"en": 4.1, "de": 5.5},
                                    intervals_before={"en": (5.4, 5.8), "de": (5.1, 5.5)},
                                    intervals_after={"en": (4.0, 4.2)}, split="report")
    ax = fig.axes[0]
    segments = [s for c in ax.collections for s in c.get_segments()]
    spans = sorted((round(s[:, 1].min(), 2), round(s[:, 1].max(), 2)) for s in segments)
    assert spans == [(4.0, 4.2), (5.1, 5.5), (5.4, 5.8)]
    assert "report split" in ax.get_ylabel()
    assert _inside_canvas(fig)


def test_jaccard_against_chance():
    m = [[1, 0.75, 0.8], [0.75, 1, 0.9], [0.8, 0.9, 1]]
    chance = [[1, 0.7, 0.7], [0.7, 1, 0.7], [0.7, 0.7, 1]]
    interval = [[[1, 1], [0.6, 0.8], [0.6, 0.8]], [[0.6, 0.8], [1, 1], [0.6, 0.8]], [[0.6, 0.8], [0.6, 0.8], [1, 1]]]
    fig = F.jaccard_heatmap(LANGS, m, chance=chance, chance_interval=interval)
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 2
    diff = panels[1].images[0].get_array()
    np.testing.assert_allclose(diff[0, 1], 0.05) and np.testing.assert_allclose(diff[1, 2], 0.2)
    assert diff.mask[0, 0]  # the diagonal is not a pair
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in panels[1].texts}
    assert texts[(1, 2)] == "+0.20*" and texts[(0, 1)] == "+0.05"  # *: above the chance interval
    assert "chance 0.70" in fig.get_suptitle().replace("\n", " ") or "chance 0.70" in panels[0].get_title()
    norm = panels[1].images[0].norm
    assert norm.vmin == pytest.approx(0.0) and norm.vmax == pytest.approx(0.2)
    assert _inside_canvas(fig)
