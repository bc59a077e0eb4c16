"""Subnetwork evaluation: mask statistics on hand-made masks, the cross-evaluation matrix on a tiny model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from stagekit import FakeContext, make_input, run_stage

from stages.evaluate import (
    CROSS_EVAL,
    MASK_STATS,
    attention_params_per_head,
    cross_matrix,
    heads_kept,
    jaccard,
    jaccard_matrix,
    mask_inputs,
    mask_statistics,
    masked_per_layer,
    params_removed,
)

# 3 layers x 4 heads; 1 = kept
A = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)  # 10 kept
B = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]], np.float32)  # 9 kept
C = np.ones((3, 4), np.float32)  # 12 kept


def write_mask(path, mask, language=None, **extra):
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "mask.npy", np.asarray(mask, np.float32))
    info = {"mask": np.asarray(mask).tolist(), **extra}
    if language is not None:
        info["language"] = language
    (path / "mask.json").write_text(json.dumps(info))
    return path


def test_jaccard_of_kept_heads():
    # A & B: layer0 3, layer1 2, layer2 2 -> 7; A | B: 4 + 4 + 4 = 12
    assert jaccard(A, B) == pytest.approx(7 / 12)
    assert jaccard(A, C) == pytest.approx(10 / 12)
    assert jaccard(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    m = jaccard_matrix([A, B, C])
    np.testing.assert_allclose(m, [[1, 7 / 12, 10 / 12], [7 / 12, 1, 9 / 12], [10 / 12, 9 / 12, 1]])


def test_masked_per_layer_is_per_layer_mean_over_languages():
    # masked/heads per layer: A [0, .5, 0], B [.25, 0, .5], C [0, 0, 0]
    np.testing.assert_allclose(masked_per_layer([A, B, C]), [0.25 / 3, 0.5 / 3, 0.5 / 3])
    np.testing.assert_allclose(masked_per_layer([A, B]), [0.125, 0.25, 0.25])
    np.testing.assert_array_equal(heads_kept([A, B, C]), [10, 9, 12])
    with pytest.raises(ValueError, match="0/1"):
        masked_per_layer([A * 0.5])


def test_parameter_counts():
    # XLM-R base: hidden 768, 12 heads of 64: Q,K,V rows 3*(64*768 + 64) + output columns 768*64
    assert attention_params_per_head(768, 12) == 4 * 768 * 64 + 3 * 64 == 196_800
    assert params_removed(A, 8) == 2 * (4 * 8 * 2 + 3 * 2)  # 2 masked heads, head_dim 2
    stats = mask_statistics(["a", "b"], [A, B], hidden_size=8, total_params=10_000)
    per_head = 4 * 8 * 2 + 3 * 2
    assert stats["params_removed"] == {"a": 2 * per_head, "b": 3 * per_head}
    assert stats["attention_params"] == 3 * (4 * 64 + 4 * 8)
    assert stats["proportion_attention_params_removed"]["b"] == pytest.approx(3 * per_head / (3 * 288))
    assert stats["proportion_params_removed"]["a"] == pytest.approx(2 * per_head / 10_000)


def test_mask_stats_stage(tmp_path):
    inputs = {
        "masks": [
            make_input(write_mask(tmp_path / "m_en", A, hidden_size=8, num_parameters=5000), "head-mask",
                       point={"language": "en"}),
            make_input(write_mask(tmp_path / "m_de", B, "de", hidden_size=8, num_parameters=5000), "head-mask"),
            make_input(write_mask(tmp_path / "m_zh", C), "head-mask", metadata={"language": "zh"}),
        ]
    }
    ctx = FakeContext(tmp_path / "run")
    meta = run_stage(MASK_STATS, {}, ctx, inputs)["metrics"]
    stats = json.loads((tmp_path / "run" / "outputs" / "metrics" / "mask_stats.json").read_text())
    assert stats["languages"] == ["en", "de", "zh"] == meta["languages"]
    assert stats["heads_kept"] == {"en": 10, "de": 9, "zh": 12}
    np.testing.assert_allclose(stats["masked_per_layer"], [0.25 / 3, 0.5 / 3, 0.5 / 3])
    assert stats["masked_per_layer_by_language"]["de"] == [0.25, 0.0, 0.5]
    assert stats["proportion_heads_masked"]["de"] == pytest.approx(3 / 12)
    np.testing.assert_allclose(stats["jaccard"]["matrix"][0], [1, 7 / 12, 10 / 12])
    assert stats["jaccard"]["labels"] == ["en", "de", "zh"]
    assert {(p["a"], p["b"]): p["jaccard"] for p in stats["jaccard_pairs"]} == pytest.approx(
        {("en", "de"): 7 / 12, ("en", "zh"): 10 / 12, ("de", "zh"): 9 / 12})
    assert stats["jaccard_min"] == pytest.approx(7 / 12) and stats["jaccard_max"] == pytest.approx(10 / 12)
    assert stats["heads_kept_by_all"] == 7 and stats["heads_kept_by_any"] == 12
    assert stats["params_removed"]["en"] == 2 * (4 * 8 * 2 + 3 * 2)
    assert stats["proportion_params_removed"]["de"] == pytest.approx(3 * 70 / 5000)


def test_mask_inputs_rejects_duplicates_and_unlabelled(tmp_path):
    en1 = make_input(write_mask(tmp_path / "a", A, "en"), "head-mask")
    en2 = make_input(write_mask(tmp_path / "b", B, "en"), "head-mask")
    with pytest.raises(ValueError, match="two head masks for language 'en'"):
        mask_inputs({"masks": [en1, en2]})
    with pytest.raises(ValueError, match="does not say its language"):
        mask_inputs({"masks": [make_input(write_mask(tmp_path / "c", A), "head-mask")]})
    with pytest.raises(ValueError, match="different shapes"):
        mask_inputs({"masks": [en1, make_input(write_mask(tmp_path / "d", np.ones((2, 2)), "de"), "head-mask")]})


def test_cross_matrix_rows_are_subnetworks_and_cols_eval_languages():
    calls = []

    def eval_fn(mask, lang):
        calls.append((None if mask is None else int(mask.sum()), lang))
        kept = 12 if mask is None else float(mask.sum())
        return {"loss": kept + (0.5 if lang == "de" else 0.0), "perplexity": 100 * kept + (1 if lang == "de" else 0)}

    out = cross_matrix([("en", A), ("de", B), ("full", None)], ["en", "de"], eval_fn)
    np.testing.assert_array_equal(out["perplexity"], [[1000, 1001], [900, 901], [1200, 1201]])
    np.testing.assert_array_equal(out["loss"], [[10, 10.5], [9, 9.5], [12, 12.5]])
    assert calls == [(10, "en"), (10, "de"), (9, "en"), (9, "de"), (None, "en"), (None, "de")]


def test_cross_eval_stage_on_tiny_model(tmp_path):
    from test_prune import make_tiny_study

    from stages.gating import HeadGates
    from stages.mlm import evaluate, language_eval_batches, load_model, load_tokenizer

    model_dir, data_dir = make_tiny_study(tmp_path / "study", languages=("en", "de"), n_test=8)
    ones = np.ones((2, 4), np.float32)
    pruned = ones.copy()
    pruned[0, :2] = 0
    pruned[1, 3] = 0
    inputs = {
        "model": make_input(model_dir, "model"),
        "dataset": make_input(data_dir, "dataset"),
        "masks": [
            make_input(write_mask(tmp_path / "m_en", ones, "en"), "head-mask", point={"language": "en"}),
            make_input(write_mask(tmp_path / "m_de", pruned, "de"), "head-mask", point={"language": "de"}),
        ],
    }
    ctx = FakeContext(tmp_path / "run")
    meta = run_stage(CROSS_EVAL, {"eval_batch_size": 4, "eval_seed": 3}, ctx, inputs)["metrics"]
    out = tmp_path / "run" / "outputs" / "metrics"
    doc = json.loads((out / "cross_eval.json").read_text())
    assert doc["rows"] == ["en", "de", "full"] == meta["rows"]
    assert doc["cols"] == ["en", "de"]
    assert doc["row_axis"] == "subnetwork" and doc["col_axis"] == "eval_language"
    ppl = np.array(doc["perplexity"])
    assert ppl.shape == (3, 2) and np.isfinite(ppl).all()
    assert doc["heads_kept"] == {"en": 8, "de": 5, "full": 8}

    # the full row is the ungated model's perplexity (masks seeded with eval_seed), per eval language
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    for j, lang in enumerate(["en", "de"]):
        batches = language_eval_batches(data_dir, lang, tok, 4, 3)
        assert ppl[2, j] == pytest.approx(evaluate(model, batches)["perplexity"], rel=1e-6)
        with HeadGates(model, pruned):
            assert ppl[1, j] == pytest.approx(evaluate(model, batches)["perplexity"], rel=1e-6)
    np.testing.assert_allclose(ppl[0], ppl[2], rtol=1e-6)  # an all-ones mask is the full model
    assert not np.allclose(ppl[1], ppl[2], rtol=1e-3)  # masking 3 heads changes perplexity
    np.testing.assert_allclose(doc["relative_perplexity"][1], ppl[1] / ppl[2], rtol=1e-9)

    rows = list(csv.reader((out / "cross_eval.csv").read_text().splitlines()))
    assert rows[0] == ["subnetwork", "en", "de"]
    assert [r[0] for r in rows[1:]] == ["en", "de", "full"]
    np.testing.assert_allclose(np.array([[float(x) for x in r[1:]] for r in rows[1:]]), ppl)
    assert ctx.logged()["perplexity/de/en"] == pytest.approx(ppl[1, 0])


def test_cross_eval_rejects_masks_of_another_shape(tmp_path):
    from test_prune import make_tiny_study

    model_dir, data_dir = make_tiny_study(tmp_path / "study", languages=("en",), n_test=4)
    inputs = {
        "model": make_input(model_dir, "model"),
        "dataset": make_input(data_dir, "dataset"),
        "masks": [make_input(write_mask(tmp_path / "m", np.ones((12, 12)), "en"), "head-mask")],
    }
    with pytest.raises(ValueError, match=r"shape \(12, 12\)"):
        run_stage(CROSS_EVAL, {}, FakeContext(tmp_path / "run"), inputs)
