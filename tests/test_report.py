"""The ``report`` stage on a small hand-made study: 3 languages, 2 layers x 4 heads, every artifact
written by hand in its documented format, run through ``FakeContext``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stagekit import FakeContext, make_input, run_stage

from stages.evaluate import mask_statistics
from stages.report import REPORT, ReportParams, Study, load_study, plan_figures

LANGS = ["en", "es", "zh"]
MASKS = {  # 1 = kept; masked per layer: en [0, .5], es [.25, .25], zh [0, 0]
    "en": np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32),
    "es": np.array([[1, 0, 1, 1], [1, 1, 1, 0]], np.float32),
    "zh": np.ones((2, 4), np.float32),
}
MASKED_MEAN = [0.25 / 3, 0.75 / 3]
# rows = subnetwork (en, es, zh, full), cols = eval language (en, es, zh): every value distinct
PPL = [[5.0, 9.0, 14.0], [7.0, 4.5, 15.0], [8.0, 10.0, 11.0], [4.8, 4.2, 10.5]]
LAYERS = [0, 1, 2]
PAIRS = {"en-es": [0.6, 0.7, 0.8], "en-zh": [0.4, 0.5, 0.45], "es-zh": [0.3, 0.35, 0.4]}
SHIFT = {"full": 0.0, "subnetwork": 0.05, "base": -0.1, "random": -0.35}
MEASURES = ("cka", "cka_debiased", "rsa", "isomorphism")

ALL_FIGURES = {
    "perplexity_before_after", "training_curve", "cross_eval_perplexity", "cross_eval_relative",
    "jaccard_kept_heads", "masked_per_layer", "pruning_trajectories", "cka_layer_by_layer", "cka_curves",
    "cka_differences", "cka_vs_syntactic_distance", "token_overlap",
}
NEEDS = {  # input -> figures that cannot be drawn without it
    "model": {"perplexity_before_after", "training_curve"},
    "masks": {"pruning_trajectories"},
    "cross_eval": {"cross_eval_perplexity", "cross_eval_relative"},
    "mask_stats": {"jaccard_kept_heads", "masked_per_layer"},
    "similarity": {"cka_layer_by_layer", "cka_curves", "cka_differences", "cka_vs_syntactic_distance"},
    "token_overlap": {"token_overlap"},
    "language_distance": {"cka_vs_syntactic_distance"},
}


def _write(path: Path, name: str, doc) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(doc), encoding="utf-8")
    return path


def _trajectory(lang: str) -> list[dict]:
    p0 = {"en": 5.0, "es": 4.5, "zh": 11.0}[lang]
    kept = int(MASKS[lang].sum())
    steps = [{"step": 0, "heads_kept": 8, "perplexity": p0, "accepted": True}]
    for i, heads in enumerate(range(7, kept - 2, -1), 1):
        ok = heads >= kept
        steps.append({"step": i, "heads_kept": heads, "perplexity": p0 * (1.03 if ok else 1.3) ** i, "accepted": ok})
    return steps


def make_study(root: Path) -> dict:
    """Every input of the report stage, as artifact directories in their documented formats."""
    per_lang = {"en": (5.65, 4.15), "es": (5.07, 3.75), "zh": (10.46, 6.73)}
    history = [
        {"step": s, "mean_loss": 1.0, "languages": {k: {"loss": 1.0, "perplexity": b + (a - b) * s / 20}
                                                     for k, (b, a) in per_lang.items()}}
        for s in (0, 10, 20)
    ]
    model = _write(root / "model", "metrics.json", {
        "languages": LANGS, "steps": 20, "best_step": 20,
        "before": {k: {"loss": float(np.log(b)), "perplexity": b} for k, (b, _) in per_lang.items()},
        "after": {k: {"loss": float(np.log(a)), "perplexity": a} for k, (_, a) in per_lang.items()},
        "mean_loss_before": 1.9, "mean_loss_after": 1.5, "history": history,
    })
    masks = []
    for lang in LANGS:
        d = root / f"mask_{lang}"
        d.mkdir(parents=True)
        np.save(d / "mask.npy", MASKS[lang])
        (d / "mask.json").write_text(json.dumps({
            "language": lang, "mask": MASKS[lang].tolist(), "heads_kept": int(MASKS[lang].sum()), "total_heads": 8,
            "threshold": 1.1, "num_layers": 2, "num_heads": 4}))
        (d / "trajectory.json").write_text(json.dumps(_trajectory(lang)))
        masks.append(make_input(d, "head-mask", name=f"t.prune.mask.language={lang}", point={"language": lang},
                                version=1))
    ppl = np.array(PPL)
    cross = _write(root / "cross_eval", "cross_eval.json", {
        "row_axis": "subnetwork", "col_axis": "eval_language", "rows": [*LANGS, "full"], "cols": LANGS,
        "perplexity": PPL, "loss": np.log(ppl).tolist(), "relative_perplexity": (ppl / ppl[-1]).tolist(),
        "heads_kept": {"en": 6, "es": 6, "zh": 8, "full": 8},
    })
    stats = _write(root / "mask_stats", "mask_stats.json", mask_statistics(LANGS, [MASKS[k] for k in LANGS]))
    pairwise = {
        model: {m: {pair: [v + shift + 0.01 * j for v in values] for pair, values in PAIRS.items()}
                for j, m in enumerate(MEASURES)}
        for model, shift in SHIFT.items()
    }
    lbl = {lang: (0.9 - 0.2 * np.abs(np.subtract.outer(LAYERS, LAYERS)) - 0.05 * i).tolist()
           for i, lang in enumerate(LANGS)}
    sim = _write(root / "similarity", "similarity.json", {
        "languages": LANGS, "reference": "en", "layers": LAYERS, "models": list(SHIFT),
        "pairwise": pairwise, "layer_by_layer": lbl, "isomorphism_method": "eigenvector similarity", "n": 50,
    })
    overlap = _write(root / "token_overlap", "token_overlap.json",
                     {"reference": "en", "languages": LANGS, "overlap": {"en": 1.0, "es": 0.31, "zh": 0.05},
                      "n": 50})
    dist = _write(root / "language_distance", "language_distance.json", {
        "method": "urielplus new_distance('syntactic')", "languages": LANGS, "reference": "en",
        "syntactic": [[0.0, 0.4, 0.6], [0.4, 0.0, 0.55], [0.6, 0.55, 0.0]]})
    single = {"model": (model, "model"), "cross_eval": (cross, "metrics"), "mask_stats": (stats, "metrics"),
              "similarity": (sim, "metrics"), "token_overlap": (overlap, "metrics"),
              "language_distance": (dist, "metrics")}
    inputs = {name: make_input(path, type_, name=f"t.{name}.out", version=3) for name, (path, type_) in single.items()}
    inputs["masks"] = masks
    return inputs


def run_report(root: Path, inputs: dict, params: dict | None = None, capture: dict | None = None):
    """Run the stage; with ``capture``, keep every Figure the stage saves (name -> Figure)."""
    import stages.figures as F

    ctx = FakeContext(root)
    with pytest.MonkeyPatch.context() as mp:
        if capture is not None:
            real = F.save

            def keep(fig, out_dir, name):
                capture[name] = fig
                return real(fig, out_dir, name)

            mp.setattr(F, "save", keep)
        meta = run_stage(REPORT, params or {}, ctx, inputs)
    return meta, root / "outputs" / "figures"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = make_study(root / "artifacts")
    figs: dict = {}
    meta, out = run_report(root / "run", inputs, capture=figs)
    return {"inputs": inputs, "meta": meta, "out": out, "figs": figs, "root": root}


# --------------------------------------------------------------------------------------------------


def test_every_figure_is_a_valid_png_and_pdf(study):
    import matplotlib.image as mpimg

    out, figs = study["out"], study["figs"]
    assert set(figs) == ALL_FIGURES
    assert set(study["meta"]["figures"]["figures"]) == ALL_FIGURES
    assert study["meta"]["figures"]["not_available"] == {}
    for name in ALL_FIGURES:
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.read_bytes().rstrip().endswith(b"%%EOF"), name
        image = mpimg.imread(png)
        w, h = figs[name].get_size_inches() * 150
        assert image.shape[:2] == (round(h), round(w)), name
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.05, f"{name} looks blank"
    assert b"CreationDate" not in (out / "cross_eval_perplexity.pdf").read_bytes()
    assert b"matplotlib" not in (out / "cross_eval_perplexity.png").read_bytes().lower()


def test_report_pages_show_every_figure_with_its_lineage(study):
    out, inputs = study["out"], study["inputs"]
    page = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "http" not in page
    for name in ALL_FIGURES:
        assert f'<img src="{name}.png"' in page and f'href="{name}.pdf"' in page
        assert f"]({name}.png)" in md
    refs = [inputs[n].ref for n in NEEDS if n != "masks"] + [m.ref for m in inputs["masks"]]
    assert "t.cross_eval.out:v3" in refs and "t.prune.mask.language=zh:v1" in refs
    for ref in refs:
        assert ref in page and ref in md
        assert inputs["cross_eval"].job_key in page
    # the caption of a figure names the artifact version it was drawn from
    block = page.split('<figure id="cross_eval_perplexity">')[1].split("</figure>")[0]
    assert "t.cross_eval.out:v3" in block and "t.similarity.out" not in block
    # key numbers: perplexity before/after, heads kept, mean Jaccard
    assert "5.65" in page and "4.15" in page and "6/8" in page and "8/8" in page
    jac = json.loads((inputs["mask_stats"].path / "mask_stats.json").read_text())["jaccard_mean"]
    assert f"mean {jac:.3f}" in page and f"mean {jac:.3f}" in md
    assert "Not available" not in page


def test_figures_json_lists_files_and_sources(study):
    index = json.loads((study["out"] / "figures.json").read_text())
    assert set(index["figures"]) == ALL_FIGURES
    entry = index["figures"]["cka_vs_syntactic_distance"]
    assert entry["files"] == ["cka_vs_syntactic_distance.png", "cka_vs_syntactic_distance.pdf"]
    assert [s["ref"] for s in entry["sources"]] == ["t.similarity.out:v3", "t.language_distance.out:v3"]
    traj = index["figures"]["pruning_trajectories"]["sources"]
    assert [s["point"] for s in traj] == [{"language": x} for x in LANGS]
    assert {s["input"] for s in index["inputs"]} == set(NEEDS)
    assert index["not_available"] == {}


def test_cross_eval_heatmap_rows_are_subnetworks_cols_eval_languages(study):
    for name, expected in (("cross_eval_perplexity", np.array(PPL)),
                           ("cross_eval_relative", np.array(PPL) / np.array(PPL)[-1])):
        ax = study["figs"][name].axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["en", "es", "zh", "full"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["en", "es", "zh"]
        assert ax.get_ylabel().startswith("subnetwork") and ax.get_xlabel().startswith("eval language")
        np.testing.assert_allclose(ax.images[0].get_array(), expected)
        assert len(study["figs"][name].axes) == 2  # the heatmap and its colorbar


def test_cross_eval_file_with_swapped_axes_is_transposed(tmp_path):
    from stages.report import cross_eval_matrix

    doc = {"row_axis": "eval_language", "col_axis": "subnetwork", "rows": ["en", "es"], "cols": ["en", "es", "full"],
           "perplexity": [[1, 2, 3], [4, 5, 6]]}
    assert cross_eval_matrix(doc) == (["en", "es", "full"], ["en", "es"], [[1, 4], [2, 5], [3, 6]])


def test_masked_per_layer_plots_the_per_layer_means(study):
    ax = study["figs"]["masked_per_layer"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["mean over languages"].get_ydata(), MASKED_MEAN)
    np.testing.assert_array_equal(lines["mean over languages"].get_xdata(), [1, 2])
    np.testing.assert_allclose(lines["en"].get_ydata(), [0.0, 0.5])
    np.testing.assert_allclose(lines["es"].get_ydata(), [0.25, 0.25])


def test_similarity_figures_use_measure_layers_and_reference(study):
    figs = study["figs"]
    # differences, mean over layers: subnetwork - full = 0.05 for every language
    ax = figs["cka_differences"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["es", "zh"]
    np.testing.assert_allclose([b.get_height() for b in ax.patches], [0.05, 0.05])
    assert "mean over layers 0-2" in ax.get_title().replace("\n", " ")
    # scatter: syntactic distance of es, zh to en vs mean cka; r of 2 points is undefined
    ax = figs["cka_vs_syntactic_distance"].axes[0]
    full = ax.collections[0].get_offsets()
    np.testing.assert_allclose(full, [[0.4, np.mean(PAIRS["en-es"])], [0.6, np.mean(PAIRS["en-zh"])]])
    assert "Pearson r undefined" in ax.get_title().replace("\n", " ")
    # curves: one panel per model, controls dashed
    axes = [a for a in figs["cka_curves"].axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["full fine-tuned model", "language subnetworks",
                                             "base model (control)", "random-init model (control)"]
    es_full = next(line for line in axes[0].get_lines() if line.get_label() == "es")
    np.testing.assert_allclose(es_full.get_ydata(), PAIRS["en-es"])
    assert all(line.get_linestyle() == "--" for line in axes[3].get_lines())
    # token overlap: the reference itself is not a bar
    ax = figs["token_overlap"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["es", "zh"]
    assert [b.get_height() for b in ax.patches] == [0.31, 0.05]
    # layer x layer heatmaps: one panel per language + a colorbar
    panels = [a for a in figs["cka_layer_by_layer"].axes if a.images]
    assert [a.get_title().split()[0] for a in panels] == LANGS
    assert any(a.get_ylabel() == "linear CKA" for a in figs["cka_layer_by_layer"].axes)


def test_layer_and_measure_parameters(tmp_path, study):
    figs: dict = {}
    inputs = {k: study["inputs"][k] for k in ("similarity", "language_distance")}
    meta, out = run_report(tmp_path, inputs, {"measure": "rsa", "layer": 2}, capture=figs)
    assert set(meta["figures"]["figures"]) == {"cka_layer_by_layer", "rsa_curves", "rsa_differences",
                                               "rsa_vs_syntactic_distance"}
    ax = figs["rsa_differences"].axes[0]
    np.testing.assert_allclose([b.get_height() for b in ax.patches], [0.05, 0.05])
    assert "layer 2" in ax.get_title().replace("\n", " ")
    offsets = figs["rsa_vs_syntactic_distance"].axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 1], [0.8 + 0.02, 0.45 + 0.02])  # rsa = cka + 0.02 in the fixture
    with pytest.raises(ValueError, match="measure 'spearman' is not in similarity.json"):
        run_report(tmp_path / "b", inputs, {"measure": "spearman"})
    with pytest.raises(ValueError, match="layer 7 is not in similarity.json"):
        run_report(tmp_path / "c", inputs, {"layer": 7})


def test_missing_optional_input_skips_only_its_figures(tmp_path, study):
    inputs = {k: v for k, v in study["inputs"].items() if k != "similarity"}
    meta, out = run_report(tmp_path, inputs)
    drawn = set(meta["figures"]["figures"])
    assert drawn == ALL_FIGURES - NEEDS["similarity"]
    assert {p.stem for p in out.glob("*.png")} == drawn == {p.stem for p in out.glob("*.pdf")}
    assert meta["figures"]["not_available"]["cka_curves"] == "not available: input similarity missing"
    page = (out / "report.html").read_text()
    assert "cka_curves</code> (Layer-by-layer cka with the reference language): not available: input similarity " \
           "missing" in page
    assert "not available: inputs similarity, language_distance missing" not in page
    assert 'src="cka_curves.png"' not in page and "t.similarity.out" not in page


@pytest.mark.parametrize("absent", sorted(NEEDS))
def test_each_input_gates_exactly_its_figures(study, absent):
    inputs = {k: v for k, v in study["inputs"].items() if k != absent}
    plans = plan_figures(load_study(inputs), ReportParams(), {})
    missing = {p.name: p.reason for p in plans if not hasattr(p, "fn")}
    assert set(missing) == NEEDS[absent]
    assert all(f"{absent}" in reason and "missing" in reason for reason in missing.values())


def test_no_inputs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no input is connected"):
        run_stage(REPORT, {}, FakeContext(tmp_path), {})
    assert Study().languages() == []


def test_misconnected_input_is_an_error(tmp_path, study):
    wrong = make_input(study["inputs"]["mask_stats"].path, "metrics", name="t.wrong")
    with pytest.raises(ValueError, match=r"input 'cross_eval' \(t.wrong:v0\) has no cross_eval.json"):
        run_stage(REPORT, {}, FakeContext(tmp_path), {"cross_eval": wrong})


def test_identical_inputs_give_identical_files(tmp_path, study):
    inputs = {k: study["inputs"][k] for k in ("cross_eval", "mask_stats", "masks")}
    _, a = run_report(tmp_path / "a", inputs)
    _, b = run_report(tmp_path / "b", inputs)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"report.html", "report.md", "figures.json", "masked_per_layer.pdf"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_stage_module_imports_no_plotting_library():
    import subprocess
    import sys

    code = "import sys, stages.report; print(sorted({'matplotlib', 'numpy'} & set(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.stdout.strip() == "[]"
