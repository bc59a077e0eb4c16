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
    norm = ax.images[0].norm
    assert norm(1.0) == pytest.approx(0.5) and norm(0.9) == pytest.approx(0.0) and norm(1.2) == pytest.approx(1.0)
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
