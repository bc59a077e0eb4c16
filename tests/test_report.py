"""The ``report`` stage on a small hand-made study: 3 languages, 2 layers x 4 heads, every artifact
written by hand in its documented format, run through ``FakeContext``.

The main study carries every extra the upstream stages now write (floors, bootstrap spreads,
size-matched random masks, chance Jaccard, perplexity intervals, the test split, provenance) and a
few planted problems the report must flag: fine-tuning made zh worse, the es subnetwork is no
better than its random masks, the full model's en-zh similarity is below its length-matched floor,
3 zh sentences were truncated, the code was dirty. ``make_study(extras=False)`` writes the older
formats, without any of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stagekit import FakeContext, make_input, run_stage

from stages.mask_stats import mask_statistics
from stages.report import REPORT, ReportParams
from stages.report_inputs import ReportInputs as Study
from stages.report_inputs import load_report_inputs as load_study
from stages.report_plan import plan_figures
from stages.report_reading import differences, sim_view
from stages.report_text import truncation_warnings

LANGS = ["en", "es", "zh"]
MASKS = {  # 1 = kept; masked per layer: en [0, .5], es [.25, .25], zh [0, 0]
    "en": np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32),
    "es": np.array([[1, 0, 1, 1], [1, 1, 1, 0]], np.float32),
    "zh": np.ones((2, 4), np.float32),
}
MASKED_MEAN = [0.25 / 3, 0.75 / 3]
# rows = subnetwork (en, es, zh, full), cols = eval language (en, es, zh): every value distinct
PPL = [[5.0, 9.0, 14.0], [7.0, 4.5, 15.0], [8.0, 10.0, 11.0], [4.8, 4.2, 10.5]]
# size-matched random masks (rows: en, es, zh): the es subnetwork (4.5) is no better than its random masks (4.4)
RANDOM_MEAN = [[5.5, 9.5, 14.5], [7.5, 4.4, 15.5], [8.2, 10.2, 11.5]]
RANDOM_ROWS = ["random (en size)", "random (es size)", "random (zh size)"]
# per-language perplexity (before, after fine-tuning): zh got worse, beyond the +-0.1 intervals
PER_LANG = {"en": (5.65, 4.15), "es": (5.07, 3.75), "zh": (10.46, 10.9)}
PROVENANCE = {
    "study": "t", "spec_path": "/abs/specs/t.yaml", "spec_hash": "feedbeef",
    "code": {"git_commit": "0123abc+dirty", "python": "3.11.2", "packages": {"torch": "2.3.0", "numpy": "2.4.6"}},
    "job": {"label": "report", "stage": "report", "stage_version": "2", "params": {}, "seed": 0},
    "upstream": [
        {"ref": "t.corpus.out:v0", "type": "corpus", "job_label": "corpus", "stage": "corpus", "stage_version": "1",
         "params": {"languages": ["en", "es", "zh"], "max_docs_per_language": 400}, "seed": 1234,
         "spec_hash": "feedbeef", "git_commit": "0123abc", "created_at": "2025-01-01T00:00:00Z", "inputs": []},
        {"ref": "t.model.out:v3", "type": "model", "job_label": "train", "stage": "train", "stage_version": "3",
         "params": {"lr": 0.0003, "config": {"hidden_size": 128}}, "seed": 1234, "spec_hash": "feedbeef",
         "git_commit": "0123abc", "created_at": "2025-01-01T00:00:00Z", "inputs": ["t.corpus.out:v0"]},
        *[{"ref": f"t.prune.mask.language={lang}:v1", "type": "head-mask", "job_label": f"prune[language={lang}]",
           "stage": "prune", "stage_version": "2", "params": {"threshold": 1.1, "language": lang}, "seed": 1234,
           "spec_hash": "feedbeef", "git_commit": "0123abc", "created_at": "2025-01-01T00:00:00Z",
           "inputs": ["t.model.out:v3"]} for lang in LANGS],
        {"ref": "t.cross_eval.out:v3", "type": "metrics", "job_label": "cross_eval", "stage": "cross_eval",
         "stage_version": None, "params": None, "seed": None, "spec_hash": None, "git_commit": None,
         "created_at": "2025-01-01T00:00:00Z",
         "inputs": ["t.model.out:v3", *[f"t.prune.mask.language={lang}:v1" for lang in LANGS]]},
        {"ref": "t.similarity.out:v3", "type": "metrics", "job_label": "similarity", "stage": "similarity",
         "stage_version": "4", "params": {"n_sentences": 50}, "seed": 1234, "spec_hash": "feedbeef",
         "git_commit": "0123abc", "created_at": "2025-01-01T00:00:00Z", "inputs": []},
    ],
}
LAYERS = [0, 1, 2]
PAIRS = {"en-es": [0.6, 0.7, 0.8], "en-zh": [0.4, 0.5, 0.45], "es-zh": [0.3, 0.35, 0.4]}
SHIFT = {"full": 0.0, "subnetwork": 0.05, "base": -0.1, "random": -0.35}
MEASURES = ("cka", "cka_debiased", "rsa", "isomorphism")
LAYER_BY_LAYER = {lang: (0.9 - 0.2 * np.abs(np.subtract.outer(LAYERS, LAYERS)) - 0.05 * i).tolist()
                  for i, lang in enumerate(LANGS)}

ALL_FIGURES = {
    "perplexity_before_after", "training_curve", "cross_eval_perplexity", "cross_eval_relative",
    "cross_eval_vs_random", "jaccard_kept_heads", "masked_per_layer", "pruning_trajectories", "cka_layer_by_layer",
    "cka_debiased_curves", "cka_debiased_differences", "cka_debiased_vs_syntactic_distance", "token_overlap",
}
NEEDS = {  # input -> figures that cannot be drawn without it
    "model": {"perplexity_before_after", "training_curve"},
    "masks": {"pruning_trajectories"},
    "cross_eval": {"cross_eval_perplexity", "cross_eval_relative", "cross_eval_vs_random"},
    "mask_stats": {"jaccard_kept_heads", "masked_per_layer"},
    "similarity": {"cka_layer_by_layer", "cka_debiased_curves", "cka_debiased_differences",
                   "cka_debiased_vs_syntactic_distance"},
    "token_overlap": {"token_overlap"},
    "language_distance": {"cka_debiased_vs_syntactic_distance"},
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


def _interval(v: float, half: float = 0.1) -> list[float]:
    return [round(v - half, 6), round(v + half, 6)]


def make_study(root: Path, extras: bool = True) -> dict:
    """Every input of the report stage, as artifact directories in their documented formats
    (``extras=False``: the formats before floors, spreads, random masks, chance and splits)."""
    per_lang = PER_LANG
    history = [
        {"step": s, "mean_loss": 1.0, "languages": {k: {"loss": 1.0, "perplexity": b + (a - b) * s / 20}
                                                     for k, (b, a) in per_lang.items()}}
        for s in (0, 10, 20)
    ]
    model_doc = {
        "languages": LANGS, "steps": 20, "best_step": 20,
        "before": {k: {"loss": float(np.log(b)), "perplexity": b} for k, (b, _) in per_lang.items()},
        "after": {k: {"loss": float(np.log(a)), "perplexity": a} for k, (_, a) in per_lang.items()},
        "mean_loss_before": 1.9, "mean_loss_after": 1.5, "history": history,
    }
    if extras:
        model_doc["eval_split"] = "report"
        for when in ("before", "after"):
            for entry in model_doc[when].values():
                entry["perplexity_interval"] = _interval(entry["perplexity"])
    model = _write(root / "model", "metrics.json", model_doc)
    masks = []
    for lang in LANGS:
        d = root / f"mask_{lang}"
        d.mkdir(parents=True)
        np.save(d / "mask.npy", MASKS[lang])
        (d / "mask.json").write_text(json.dumps({
            "language": lang, "mask": MASKS[lang].tolist(), "heads_kept": int(MASKS[lang].sum()), "total_heads": 8,
            "threshold": 1.1, "num_layers": 2, "num_heads": 4, "normalize_over": "all", "normalize_layers": True,
            "normalize_global": True}))
        (d / "trajectory.json").write_text(json.dumps(_trajectory(lang)))
        masks.append(make_input(d, "head-mask", name=f"t.prune.mask.language={lang}", point={"language": lang},
                                version=1))
    ppl = np.array(PPL)
    cross_doc = {
        "row_axis": "subnetwork", "col_axis": "eval_language", "rows": [*LANGS, "full"], "cols": LANGS,
        "perplexity": PPL, "loss": np.log(ppl).tolist(), "relative_perplexity": (ppl / ppl[-1]).tolist(),
        "heads_kept": {"en": 6, "es": 6, "zh": 8, "full": 8},
    }
    if extras:
        cross_doc |= {
            "eval_split": "report",
            "perplexity_interval": [[_interval(v, 0.02 * v) for v in row] for row in PPL],
            "random": {"seeds": [0, 1, 2], "rows": LANGS, "perplexity_mean": RANDOM_MEAN,
                       "perplexity_std": [[0.1] * 3 for _ in LANGS],
                       "relative_to_random": (ppl[:3] / np.array(RANDOM_MEAN)).tolist()},
        }
    cross = _write(root / "cross_eval", "cross_eval.json", cross_doc)
    stats_doc = mask_statistics(LANGS, [MASKS[k] for k in LANGS])
    stats_doc.pop("jaccard_chance", None)  # the values below are planted by hand
    if extras:
        eye = np.eye(3, dtype=bool)
        stats_doc["jaccard_chance"] = {"labels": LANGS, "mean": np.where(eye, 1.0, 0.5).tolist(),
                                       "interval": [[[1.0, 1.0] if i == j else [0.4, 0.6] for j in range(3)]
                                                    for i in range(3)]}
    stats = _write(root / "mask_stats", "mask_stats.json", stats_doc)
    pairwise = {
        model: {m: {pair: [v + shift + 0.01 * j for v in values] for pair, values in PAIRS.items()}
                for j, m in enumerate(MEASURES)}
        for model, shift in SHIFT.items()
    }
    sim_doc = {
        "languages": LANGS, "reference": "en", "layers": LAYERS, "models": list(SHIFT),
        "pairwise": pairwise, "layer_by_layer": LAYER_BY_LAYER, "isomorphism_method": "eigenvector similarity", "n": 50,
    }
    if extras:
        sim_doc |= similarity_extras(pairwise)
    sim = _write(root / "similarity", "similarity.json", sim_doc)
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


def similarity_extras(pairwise: dict) -> dict:
    """Floors, bootstrap spreads and truncation counts of similarity.json: the full model's en-zh
    similarity is planted below its length-matched floor; every spread is +-0.03."""
    floors, spread = {}, {}
    for model in ("full", "subnetwork", "random"):
        floors[model] = {m: {"length_matched": {pair: [v - 0.2 for v in c] for pair, c in pairwise[model][m].items()},
                             "shuffled": {pair: [0.43 if m == "cka" else 0.01] * len(c)
                                          for pair, c in pairwise[model][m].items()}}
                         for m in ("cka", "cka_debiased")}
    floors["full"]["cka_debiased"]["length_matched"]["en-zh"] = [v + 0.02 for v in pairwise["full"]["cka_debiased"]["en-zh"]]
    for model, per_measure in pairwise.items():
        spread[model] = {m: {pair: [[v - 0.03, v + 0.03] for v in c] for pair, c in per_pair.items()}
                         for m, per_pair in per_measure.items() if m in ("cka", "cka_debiased")}
    return {"floors": floors, "spread": spread, "spread_difference": paired_differences(pairwise),
            "encodings": ENCODINGS, "layer_by_layer_measure": "cka",
            "layer_by_layer_debiased": {lang: (np.array(m) - 0.3).tolist() for lang, m in LAYER_BY_LAYER.items()},
            "bootstrap": {"resamples": 200, "confidence": 0.95, "unit": "sentence", "method": "percentile"}}


def paired_differences(pairwise: dict) -> dict:
    """similarity.json ``spread_difference``: subnetwork - full +-0.01 (paired: narrower than the
    +-0.03 of each model, whose half-widths in quadrature give +-0.042)."""
    sub, full = pairwise["subnetwork"], pairwise["full"]
    return {"subnetwork-full": {m: {pair: [[s - f - 0.01, s - f + 0.01] for s, f in zip(c, full[m][pair], strict=True)]
                                    for pair, c in sub[m].items()} for m in ("cka", "cka_debiased")}}


# what encode recorded about truncation, as similarity.json copies it: 3 zh sentences cut at 128 tokens
ENCODINGS = {
    **{variant: {"max_length": 128, "truncated": {"en": 0, "es": 0, "zh": 3}, "truncated_total": 3, "n": 50}
       for variant in ("full", "base", "random")},
    **{f"subnetwork:{lang}": {"max_length": 128, "truncated": {lang: 3 if lang == "zh" else 0},
                              "truncated_total": 3 if lang == "zh" else 0, "n": 50} for lang in LANGS},
}


def run_report(root: Path, inputs: dict, params: dict | None = None, capture: dict | None = None,
               provenance: dict | None = None, render: bool = True):
    """Run the stage; with ``capture``, keep every Figure the stage saves (name -> Figure);
    ``render=False``: build the figures but write no PNG/PDF (fast: for tests of the page)."""
    import stages.figures as F

    ctx = FakeContext(root, provenance=provenance or {})
    with pytest.MonkeyPatch.context() as mp:
        if capture is not None or not render:
            real = F.save

            def keep(fig, out_dir, name):
                if capture is not None:
                    capture[name] = fig
                return real(fig, out_dir, name) if render else [f"{name}.png", f"{name}.pdf"]

            mp.setattr(F, "save", keep)
        meta = run_stage(REPORT, params or {}, ctx, inputs)
    return meta, root / "outputs" / "figures"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = make_study(root / "artifacts")
    figs: dict = {}
    meta, out = run_report(root / "run", inputs, capture=figs, provenance=PROVENANCE)
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
    assert "Not available" not in page and "Not shown" not in page


def test_figures_json_lists_files_and_sources(study):
    index = json.loads((study["out"] / "figures.json").read_text())
    assert set(index["figures"]) == ALL_FIGURES
    entry = index["figures"]["cka_debiased_vs_syntactic_distance"]
    assert entry["files"] == ["cka_debiased_vs_syntactic_distance.png", "cka_debiased_vs_syntactic_distance.pdf"]
    assert [s["ref"] for s in entry["sources"]] == ["t.similarity.out:v3", "t.language_distance.out:v3"]
    traj = index["figures"]["pruning_trajectories"]["sources"]
    assert [s["point"] for s in traj] == [{"language": x} for x in LANGS]
    assert {s["input"] for s in index["inputs"]} == set(NEEDS)
    assert index["not_available"] == {}


def test_cross_eval_heatmap_rows_are_subnetworks_cols_eval_languages(study):
    for name, rows, expected in (
        ("cross_eval_perplexity", [*LANGS, "full", *RANDOM_ROWS], np.array(PPL + RANDOM_MEAN)),
        ("cross_eval_relative", [*LANGS, "full"], np.array(PPL) / np.array(PPL)[-1]),
    ):
        ax = study["figs"][name].axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == rows
        assert [t.get_text() for t in ax.get_xticklabels()] == ["en", "es", "zh"]
        assert ax.get_ylabel().startswith("subnetwork") and ax.get_xlabel().startswith("eval language")
        np.testing.assert_allclose(ax.images[0].get_array(), expected)
        assert len(study["figs"][name].axes) == 2  # the heatmap and its colorbar


def test_cross_eval_file_with_swapped_axes_is_transposed(tmp_path):
    from stages.report_reading import cross_eval_matrix

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
    ax = figs["cka_debiased_differences"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["es", "zh"]
    np.testing.assert_allclose([b.get_height() for b in ax.patches], [0.05, 0.05])
    assert "mean over layers 0-2" in ax.get_title().replace("\n", " ")
    # scatter: syntactic distance of es, zh to en vs mean cka; r of 2 points is undefined
    ax = figs["cka_debiased_vs_syntactic_distance"].axes[0]
    full = ax.collections[0].get_offsets()  # cka_debiased = cka + 0.01 in the fixture
    np.testing.assert_allclose(full, [[0.4, np.mean(PAIRS["en-es"]) + 0.01], [0.6, np.mean(PAIRS["en-zh"]) + 0.01]])
    assert "Pearson r undefined" in ax.get_title().replace("\n", " ")
    # curves: one panel per model, controls dashed
    axes = [a for a in figs["cka_debiased_curves"].axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["full fine-tuned model", "language subnetworks",
                                             "base model (control)", "random-init model (control)"]
    es_full = next(line for line in axes[0].get_lines() if line.get_label() == "es")
    np.testing.assert_allclose(es_full.get_ydata(), np.array(PAIRS["en-es"]) + 0.01)
    random_lines = [line for line in axes[3].get_lines() if line.get_label() in LANGS]
    assert random_lines and all(line.get_linestyle() == "--" for line in random_lines)  # its floors: dotted
    # token overlap: the reference itself is not a bar
    ax = figs["token_overlap"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["es", "zh"]
    assert [b.get_height() for b in ax.patches] == [0.31, 0.05]
    # layer x layer heatmaps: one panel per language + a colorbar
    panels = [a for a in figs["cka_layer_by_layer"].axes if a.images]
    assert [a.get_title().split()[0] for a in panels] == LANGS
    assert any(a.get_ylabel() == "debiased CKA" for a in figs["cka_layer_by_layer"].axes)  # the report's measure
    np.testing.assert_allclose(panels[1].images[0].get_array(), np.array(LAYER_BY_LAYER["es"]) - 0.3)


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
    assert meta["figures"]["not_available"]["cka_debiased_curves"] == "not available: input similarity missing"
    page = (out / "report.html").read_text()
    assert "cka_debiased_curves</code> (Layer-by-layer cka_debiased with the reference language): not available: " \
           "input similarity missing" in page
    assert "not available: inputs similarity, language_distance missing" not in page
    assert 'src="cka_debiased_curves.png"' not in page and "t.similarity.out:v3" not in page


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


# --------------------------------------------------------------------------------------------------
# Review fixes: debiased CKA by default, floors, spreads, random masks, chance, splits, provenance,
# warnings, a reading of the results and the study's own notes
# --------------------------------------------------------------------------------------------------


def _section(page: str, heading: str) -> str:
    """The HTML between ``<h2>heading</h2>`` and the next ``<h2>``."""
    assert f"<h2>{heading}</h2>" in page, f"no section {heading!r}"
    return page.split(f"<h2>{heading}</h2>")[1].split("<h2>")[0]


def test_debiased_cka_is_the_default_measure(study):
    assert ReportParams().measure == "cka_debiased"
    assert study["meta"]["figures"]["measure"] == "cka_debiased"
    assert "debiased CKA" in study["figs"]["cka_debiased_curves"].axes[0].get_ylabel()


def test_warnings_flag_suspicious_results_in_words(study):
    page = (study["out"] / "report.html").read_text(encoding="utf-8")
    md = (study["out"] / "report.md").read_text(encoding="utf-8")
    assert page.index("<h2>Warnings</h2>") < page.index("<h2>Key numbers</h2>")
    warnings = " ".join(study["meta"]["figures"]["warnings"])
    section = _section(page, "Warnings")
    for text in (warnings, section, md.split("## Warnings")[1].split("\n## ")[0]):
        assert "length-matched floor" in text and "zh" in text  # control at or above the trained model
        assert "Fine-tuning made zh worse" in text and "Fine-tuning made es worse" not in text
        assert "es subnetwork is no better than its size-matched random masks" in text
        assert "en subnetwork is no better" not in text
        assert "3 of 50 sentences of zh were cut at 128 tokens" in text and "not fully parallel" in text
        assert "uncommitted changes" in text
        assert "biased linear CKA" not in text
    assert "10.46 [10.36, 10.56]" in section and "10.90 [10.80, 11.00]" in section


def test_biased_cka_is_flagged_and_its_shuffled_floor_drawn(tmp_path, study):
    figs: dict = {}
    meta, out = run_report(tmp_path, {"similarity": study["inputs"]["similarity"]}, {"measure": "cka"}, capture=figs)
    assert any("biased linear CKA" in w and "0.43" in w for w in meta["figures"]["warnings"])
    labels = [t.get_text() for t in figs["cka_curves"].legends[0].get_texts()]
    assert any("shuffled-row floor" in x for x in labels)


def test_reading_section_says_which_controls_the_model_beats_and_what_is_noise(study):
    page = (study["out"] / "report.html").read_text(encoding="utf-8")
    reading = _section(page, "Reading these results")
    assert page.index("<h2>Reading these results</h2>") < page.index("<h2>Key numbers</h2>")
    # the full model beats the random-init and base controls for es and zh, beyond the intervals; not zh's floor
    assert "above the random-init model (control) for 2 of 2 languages" in reading
    assert "above the length-matched floor for 1 of 2 languages (not: zh)" in reading
    assert "beyond the 95% bootstrap interval" in reading
    assert "size-matched random masks" in reading and "2 of 3" in reading
    assert "chance" in reading and "Jaccard" in reading


def test_headline_numbers_carry_their_spread(study):
    page = (study["out"] / "report.html").read_text(encoding="utf-8")
    key = _section(page, "Key numbers")
    assert "5.65 [5.55, 5.75]" in key and "4.15 [4.05, 4.25]" in key  # perplexity before / after
    assert "4.50 [4.41, 4.59]" in key  # es subnetwork on es, with its interval
    assert "4.40 ± 0.10 (3 seeds)" in key  # es-sized random masks
    es_full = np.mean(PAIRS["en-es"]) + 0.01
    assert f"{es_full:.3f} [{es_full - 0.03:.3f}, {es_full + 0.03:.3f}]" in key  # full model, en vs es
    assert "chance 0.500 [0.400, 0.600]" in key  # mean Jaccard against chance
    assert "+0.050 [+0.040, +0.060]" in key  # subnetwork - full, with its paired interval
    assert "subnetworks minus full model, paired interval" in key and "approximate" not in key


def test_figures_say_which_test_split_their_numbers_come_from(study):
    page = (study["out"] / "report.html").read_text(encoding="utf-8")
    for name in ("perplexity_before_after", "cross_eval_perplexity", "cross_eval_relative", "cross_eval_vs_random"):
        block = page.split(f'<figure id="{name}">')[1].split("</figure>")[0]
        assert "Test split: report" in block, name
    assert "report split" in study["figs"]["perplexity_before_after"].axes[0].get_ylabel()
    assert "report split" in study["figs"]["cross_eval_perplexity"].axes[0].get_xlabel()


def test_cross_eval_against_size_matched_random_masks(study):
    fig = study["figs"]["cross_eval_vs_random"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == LANGS
    np.testing.assert_allclose(ax.images[0].get_array(), np.array(PPL[:3]) / np.array(RANDOM_MEAN))
    assert "size-matched random masks" in fig.axes[1].get_ylabel()
    norm = ax.images[0].norm
    assert norm.vmax == pytest.approx((np.array(PPL[:3]) / np.array(RANDOM_MEAN)).max())
    # the absolute heatmap's random rows carry their spread
    texts = [t.get_text() for t in study["figs"]["cross_eval_perplexity"].axes[0].texts]
    assert "4.40\n±0.10" in texts


def test_similarity_figures_draw_floors_and_spreads(study):
    figs = study["figs"]
    full = figs["cka_debiased_curves"].axes[0]
    dotted = {tuple(np.round(ln.get_ydata(), 3)) for ln in full.get_lines() if ln.get_linestyle() == ":"}
    zh = np.array(PAIRS["en-zh"]) + 0.01
    assert tuple(np.round(zh + 0.02, 3)) in dotted  # the planted zh floor
    assert len([c for c in full.collections if c.get_paths()]) == 3  # es and zh spreads, the shuffled floor
    diff = figs["cka_debiased_differences"].axes[0]
    assert any("floor" in ln.get_label() for ln in diff.get_lines())
    assert [s for c in diff.collections for s in c.get_segments()]  # intervals
    page = (study["out"] / "report.html").read_text(encoding="utf-8")
    block = page.split('<figure id="cka_debiased_curves">')[1].split("</figure>")[0]
    assert "length-matched floor" in block and "sentence length" in block and "200 resamples" in block


def test_jaccard_is_drawn_against_chance(study):
    fig = study["figs"]["jaccard_kept_heads"]
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 2
    stats = json.loads((study["inputs"]["mask_stats"].path / "mask_stats.json").read_text())
    np.testing.assert_allclose(panels[1].images[0].get_array()[0, 1], stats["jaccard"]["matrix"][0][1] - 0.5)


def test_scatter_reports_r_with_interval_and_n(study):
    title = study["figs"]["cka_debiased_vs_syntactic_distance"].axes[0].get_title().replace("\n", " ")
    assert "n = 2" in title


def test_masked_per_layer_legend_follows_the_study_order(tmp_path, study):
    order = ["zh", "es", "en"]  # mask_stats in another order than the study's (the model's languages)
    stats = _write(tmp_path / "stats", "mask_stats.json", mask_statistics(order, [MASKS[k] for k in order]))
    inputs = {"model": study["inputs"]["model"], "mask_stats": make_input(stats, "metrics", name="t.stats")}
    figs: dict = {}
    run_report(tmp_path / "run", inputs, capture=figs)
    labels = [t.get_text() for t in figs["masked_per_layer"].axes[0].get_legend().get_texts()]
    assert labels == [*LANGS, "mean over languages"]


def test_provenance_section_and_per_figure_upstream_jobs(study):
    page = (study["out"] / "report.html").read_text(encoding="utf-8")
    md = (study["out"] / "report.md").read_text(encoding="utf-8")
    for text in (_section(page, "Provenance"), md.split("## Provenance")[1]):
        assert "/abs/specs/t.yaml" in text and "feedbeef" in text
        assert "0123abc" in text and "uncommitted changes" in text
        assert "torch" in text and "2.3.0" in text and "3.11.2" in text
        assert "threshold=1.1" in text and "t.corpus.out:v0" in text and "max_docs_per_language=400" in text
        assert "prune[language=zh]" in text and "seed" in text
    index = json.loads((study["out"] / "figures.json").read_text())
    assert index["provenance"]["spec_hash"] == "feedbeef"
    jobs = [u["job_label"] for u in index["figures"]["perplexity_before_after"]["upstream"]]
    assert jobs == ["corpus", "train"]
    jobs = [u["job_label"] for u in index["figures"]["cross_eval_perplexity"]["upstream"]]
    assert jobs == ["corpus", "train", "prune[language=en]", "prune[language=es]", "prune[language=zh]", "cross_eval"]
    assert index["figures"]["cross_eval_perplexity"]["upstream"][-1]["params"] is None
    block = page.split('<figure id="perplexity_before_after">')[1].split("</figure>")[0]
    assert "Upstream jobs: corpus, train" in block


def test_notes_param_adds_the_studys_own_section(tmp_path, study):
    notes = ("Only **seven** languages & a tiny model.\n\n- one seed\n- `cka_debiased` at 500 sentences\n\n"
             "<script>x</script>")
    params = {"notes": notes, "notes_title": "What this demo shows and does not show"}
    _, out = run_report(tmp_path, {"mask_stats": study["inputs"]["mask_stats"]}, params)
    page = (out / "report.html").read_text(encoding="utf-8")
    section = _section(page, "What this demo shows and does not show")
    assert "<strong>seven</strong> languages &amp; a tiny model" in section
    assert "<li>one seed</li>" in section and "<code>cka_debiased</code>" in section
    assert "<script>" not in page and "&lt;script&gt;" in section
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## What this demo shows and does not show\n\nOnly **seven** languages" in md
    assert "<h2>What" not in (run_report(tmp_path / "b", {"mask_stats": study["inputs"]["mask_stats"]})[1]
                              / "report.html").read_text()


def test_older_artifacts_still_give_a_report_that_says_what_it_lacks(tmp_path):
    inputs = make_study(tmp_path / "old", extras=False)
    inputs = {k: inputs[k] for k in ("model", "cross_eval", "mask_stats", "similarity")}
    figs: dict = {}
    meta, out = run_report(tmp_path / "run", inputs, capture=figs, render=False)  # no provenance: an older engine
    drawn = set(meta["figures"]["figures"])
    assert "cross_eval_vs_random" not in drawn and {"cka_debiased_curves", "jaccard_kept_heads"} <= drawn
    assert "random masks" in meta["figures"]["not_available"]["cross_eval_vs_random"]
    page = (out / "report.html").read_text(encoding="utf-8")
    shown = _section(page, "Not shown")
    for gap in ("has no floors", "has no bootstrap spread", "has no chance Jaccard", "has no perplexity intervals",
                "has no debiased layer-by-layer"):
        assert gap in shown, gap
    assert "Test split not recorded" in page.split('<figure id="cross_eval_perplexity">')[1].split("</figure>")[0]
    assert "not recorded" in _section(page, "Provenance")
    assert "Fine-tuning made zh worse" in _section(page, "Warnings")  # no interval: flagged, and says so
    assert "no interval recorded" in _section(page, "Warnings")
    assert len([a for a in figs["jaccard_kept_heads"].axes if a.images]) == 1


# --------------------------------------------------------------------------------------------------
# Paired intervals of the differences, truncation as encode recorded it, debiased layer x layer CKA
# --------------------------------------------------------------------------------------------------


def _similarity_study(tmp_path: Path, study, drop: tuple[str, ...] = ()) -> Study:
    """The main study's similarity.json without the entries ``drop``, as the only input."""
    doc = json.loads((study["inputs"]["similarity"].path / "similarity.json").read_text())
    path = _write(tmp_path / "similarity", "similarity.json", {k: v for k, v in doc.items() if k not in drop})
    return load_study({"similarity": make_input(path, "metrics", name="t.similarity.out", version=4)})


def test_differences_carry_the_paired_interval_when_similarity_records_it(study):
    figs, out = study["figs"], study["out"]
    diff = figs["cka_debiased_differences"]
    spans = sorted((round(s[:, 1].min(), 3), round(s[:, 1].max(), 3))
                   for c in diff.axes[0].collections for s in c.get_segments())
    assert spans == [(0.04, 0.06), (0.04, 0.06)]  # +-0.01, not the quadrature +-0.042
    assert "paired interval" in [t.get_text() for t in diff.legends[0].get_texts()]
    page = (out / "report.html").read_text(encoding="utf-8")
    block = page.split('<figure id="cka_debiased_differences">')[1].split("</figure>")[0]
    assert "paired" in block and "quadrature" not in block
    reading = _section(page, "Reading these results")
    assert "the paired interval excludes 0 for 2 (es, zh)" in reading


def test_older_similarity_falls_back_to_the_approximate_interval(tmp_path, study):
    old = _similarity_study(tmp_path, study, drop=("spread_difference",))
    view = sim_view(old.docs["similarity"], "cka_debiased", None)
    (d, (lo, hi)) = differences(view)["zh"]
    assert d == pytest.approx(0.05) and (lo, hi) == (pytest.approx(0.05 - 0.03 * 2**0.5), pytest.approx(0.05 + 0.03 * 2**0.5))
    plan = next(p for p in plan_figures(old, ReportParams(), {}) if p.name == "cka_debiased_differences")
    assert "approximate" in plan.caption and "quadrature" in plan.caption
    assert plan.kwargs["interval_label"] == "approximate interval"
    assert any("no paired intervals" in gap for gap in plan.gaps)
    new = _similarity_study(tmp_path / "new", study)
    plan = next(p for p in plan_figures(new, ReportParams(), {}) if p.name == "cka_debiased_differences")
    assert plan.kwargs["interval_label"] == "paired interval" and not plan.gaps
    assert differences(sim_view(new.docs["similarity"], "cka_debiased", 1))["es"][1] == \
        (pytest.approx(0.04), pytest.approx(0.06))  # at one layer


def test_truncation_warning_reads_what_encode_recorded():
    doc = {"n": 50, "encodings": {
        "full": {"max_length": 128, "truncated": {"en": 0, "zh": 3}, "truncated_total": 3, "n": 50},
        "base": {"max_length": 512, "truncated": {"en": 0, "zh": 0}, "truncated_total": 0, "n": 50},
        "subnetwork:zh": {"max_length": 128, "truncated": {"zh": 3}, "truncated_total": 3, "n": 50},
        "subnetwork:en": {"max_length": 128, "truncated": {"en": 0}, "truncated_total": 0, "n": 50},
        "random": {"max_length": None, "truncated": None, "truncated_total": None, "n": 50},  # encode version 1
    }}
    assert truncation_warnings(Study(docs={"similarity": doc})) == [
        "Truncated encodings: 3 of 50 sentences of zh were cut at 128 tokens (in the encodings of full, "
        "subnetwork:zh): their pairs are not fully parallel, since the cut tokens are missing on the zh side."]
    doc["encodings"]["base"]["truncated"]["en"] = 4  # another limit, another count: its own warning
    assert len(truncation_warnings(Study(docs={"similarity": doc}))) == 2
    assert truncation_warnings(Study(docs={"similarity": {"n": 50}})) == []


def test_layer_by_layer_heatmaps_follow_the_reports_measure(tmp_path, study):
    new = _similarity_study(tmp_path, study)
    doc = new.docs["similarity"]

    def heatmap(s: Study, measure: str):
        return next(p for p in plan_figures(s, ReportParams(measure=measure), {}) if p.name == "cka_layer_by_layer")

    plan = heatmap(new, "cka_debiased")
    assert plan.args[0] == doc["layer_by_layer_debiased"] and plan.kwargs["measure"] == "debiased CKA"
    assert "debiased CKA" in plan.caption and not plan.gaps
    plan = heatmap(new, "cka")
    assert plan.args[0] == doc["layer_by_layer"] and plan.kwargs["measure"] == "biased linear CKA"
    assert heatmap(new, "rsa").kwargs["measure"] == "debiased CKA"  # CKA only: the unbiased one
    old = _similarity_study(tmp_path / "old", study, drop=("layer_by_layer_debiased", "layer_by_layer_measure"))
    plan = heatmap(old, "cka_debiased")
    assert plan.args[0] == doc["layer_by_layer"] and plan.kwargs["measure"] == "biased linear CKA"
    assert any("no debiased layer-by-layer" in gap for gap in plan.gaps)


def test_the_pruning_figure_says_how_importance_was_normalised(study):
    """Which heads count in each layer's norm and the min-max changes the masks: the page says it."""
    index = json.loads((study["out"] / "figures.json").read_text())
    caption = index["figures"]["pruning_trajectories"]["caption"]
    assert "normalize_over=all" in caption and "each layer's L2 norm" in caption


def test_key_numbers_put_the_random_models_similarity_next_to_its_own_length_floor(study):
    """A random-init model far above the trained one says little when nearly all of it is its own
    length-matched floor: the table shows both."""
    key = _section((study["out"] / "report.html").read_text(encoding="utf-8"), "Key numbers")
    assert "length-matched floor (random-init model)" in key and "length-matched floor (full model)" in key
