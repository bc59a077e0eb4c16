"""Subnetwork evaluation: mask statistics on hand-made masks, the cross-evaluation matrix on a tiny model,
size-matched random masks and chance levels."""

from __future__ import annotations

import csv
import json
import shutil
import zlib

import numpy as np
import pytest
from stagekit import FakeContext, make_input, run_stage

from stages.evaluate import CROSS_EVAL, cross_matrix, mask_key
from stages.formats.masks import mask_inputs
from stages.mask_stats import (
    MASK_STATS,
    attention_params_per_head,
    heads_kept,
    jaccard,
    jaccard_chance,
    jaccard_chance_matrix,
    jaccard_matrix,
    mask_statistics,
    masked_per_layer,
    params_removed,
)
from stages.random_masks import random_baseline, random_mask_seeds, size_matched_random_mask

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


def test_size_matched_random_mask_keeps_every_layers_count():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], np.float32)
    before = mask.copy()
    draws = [size_matched_random_mask(mask, np.random.default_rng(s)) for s in range(20)]
    for r in draws:
        assert r.shape == mask.shape and r.dtype == np.float32 and set(np.unique(r)) <= {0.0, 1.0}
        np.testing.assert_array_equal(r.sum(axis=1), mask.sum(axis=1))  # exactly the same heads per layer
        np.testing.assert_array_equal(r[1], 1) and np.testing.assert_array_equal(r[2], 0)  # full/empty layers
    np.testing.assert_array_equal(mask, before)  # input untouched
    assert len({r.tobytes() for r in draws}) > 10  # the seeds give different masks
    again = size_matched_random_mask(mask, np.random.default_rng(3))
    np.testing.assert_array_equal(again, draws[3])  # reproducible from the seed
    # uniform over the positions: each head of layer 0 is kept in about half of many draws
    rng = np.random.default_rng(0)
    share = np.mean([size_matched_random_mask(mask, rng)[0] for _ in range(4000)], axis=0)
    np.testing.assert_allclose(share, 0.5, atol=0.04)
    with pytest.raises(ValueError, match="layers, heads"):
        size_matched_random_mask(np.ones(4), np.random.default_rng(0))


def test_random_mask_seeds_derive_from_the_stage_seed():
    seeds = random_mask_seeds(1234, 5)
    assert len(seeds) == len(set(seeds)) == 5 and all(isinstance(x, int) for x in seeds)
    assert seeds == random_mask_seeds(1234, 5)
    assert random_mask_seeds(1234, 8)[:5] == seeds  # more seeds keep the first ones
    assert random_mask_seeds(1235, 5) != seeds
    assert random_mask_seeds(1234, 0) == []


def test_random_baseline_summaries():
    own = np.array([[2.0, 4.0]])  # one subnetwork row, two eval columns
    rnd = np.array([[[2.0, 8.0], [4.0, 8.0], [6.0, 8.0]]])  # three random masks
    out = random_baseline(own, rnd)
    np.testing.assert_allclose(out["perplexity_mean"], [[4.0, 8.0]])
    np.testing.assert_allclose(out["perplexity_std"], [[2.0, 0.0]])  # sample standard deviation (ddof 1)
    np.testing.assert_allclose(out["perplexity_min"], [[2.0, 8.0]])
    np.testing.assert_allclose(out["perplexity_max"], [[6.0, 8.0]])
    np.testing.assert_allclose(out["relative_to_random"], [[0.5, 0.5]])
    single = random_baseline(own, rnd[:, :1])
    assert np.isnan(single["perplexity_std"]).all()  # one draw has no spread
    with pytest.raises(ValueError, match="rows"):
        random_baseline(own, rnd[:, :, :1])


def test_jaccard_chance_matches_the_hypergeometric_closed_form():
    # one layer of 4 heads, both masks keep 2: |A ∩ B| = 0, 1, 2 with probability 1/6, 4/6, 1/6
    # (hypergeometric), the Jaccard index is then 0, 1/3, 1: expectation 4/6 * 1/3 + 1/6 = 7/18
    a = np.array([[1, 1, 0, 0]], np.float32)
    b = np.array([[0, 1, 1, 0]], np.float32)
    mean, lo, hi = jaccard_chance(a, b)
    assert mean == pytest.approx(7 / 18)
    assert (lo, hi) == (0.0, 1.0)  # P(J = 0) = 1/6 > 5%, P(J = 1) = 1/6 > 5%
    # several layers: the intersection is a sum of per-layer hypergeometrics; check against simulation
    a = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], np.float32)
    b = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], np.float32)
    mean, lo, hi = jaccard_chance(a, b)
    rng = np.random.default_rng(0)
    sims = np.array([jaccard(size_matched_random_mask(a, rng), size_matched_random_mask(b, rng))
                     for _ in range(20000)])
    assert mean == pytest.approx(sims.mean(), abs=0.005)
    assert lo == pytest.approx(np.quantile(sims, 0.05, method="inverted_cdf"), abs=1e-9)
    assert hi == pytest.approx(np.quantile(sims, 0.95, method="inverted_cdf"), abs=1e-9)
    assert lo < mean < hi
    # full masks always overlap completely; empty masks count as identical (as jaccard does)
    assert jaccard_chance(np.ones((2, 3)), np.ones((2, 3))) == (1.0, 1.0, 1.0)
    assert jaccard_chance(np.zeros((2, 3)), np.zeros((2, 3))) == (1.0, 1.0, 1.0)
    means, intervals = jaccard_chance_matrix([A, B, C])
    assert means.shape == (3, 3) and intervals.shape == (3, 3, 2)
    np.testing.assert_allclose(means, means.T)
    assert means[0, 1] == pytest.approx(jaccard_chance(A, B)[0])
    assert means[0, 2] == pytest.approx(10 / 12)  # against a full mask the overlap is fixed: no chance spread
    np.testing.assert_allclose(intervals[0, 2], [10 / 12, 10 / 12])


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
    chance = stats["jaccard_chance"]
    assert chance["labels"] == ["en", "de", "zh"] and chance["quantiles"] == [0.05, 0.95]
    means, intervals = jaccard_chance_matrix([A, B, C])
    np.testing.assert_allclose(chance["mean"], means)
    np.testing.assert_allclose(chance["interval"], intervals)
    pair = next(p for p in stats["jaccard_pairs"] if (p["a"], p["b"]) == ("en", "de"))
    assert pair["chance_mean"] == pytest.approx(means[0, 1]) and pair["chance_interval"] == list(intervals[0, 1])
    assert stats["jaccard_chance_mean"] == pytest.approx(np.mean([means[0, 1], means[0, 2], means[1, 2]]))


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
    ctx = FakeContext(tmp_path / "run", seed=21)
    params = {"eval_batch_size": 4, "eval_seed": 3, "random_mask_seeds": 3}
    meta = run_stage(CROSS_EVAL, params, ctx, inputs)["metrics"]
    out = tmp_path / "run" / "outputs" / "metrics"
    doc = json.loads((out / "cross_eval.json").read_text())
    cells = ctx.reported[-1][1]  # ctx.progress: 0, then each cell, of every row's and random mask's cells
    assert ctx.reported == [(n, cells, "cell") for n in range(cells + 1)] and cells > 3 * 2
    assert doc["rows"] == ["en", "de", "full"] == meta["rows"]
    assert doc["eval_split"] == "report" == meta["eval_split"]
    assert doc["cols"] == ["en", "de"]
    assert doc["row_axis"] == "subnetwork" and doc["col_axis"] == "eval_language"
    ppl = np.array(doc["perplexity"])
    assert ppl.shape == (3, 2) and np.isfinite(ppl).all()
    assert doc["heads_kept"] == {"en": 8, "de": 5, "full": 8}

    # the full row is the ungated model's perplexity on the reporting half (masks seeded with eval_seed)
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    for j, lang in enumerate(["en", "de"]):
        batches = language_eval_batches(data_dir, lang, tok, 4, 3, split="report")
        assert ppl[2, j] == pytest.approx(evaluate(model, batches)["perplexity"], rel=1e-6)
        with HeadGates(model, pruned):
            assert ppl[1, j] == pytest.approx(evaluate(model, batches)["perplexity"], rel=1e-6)
        select = language_eval_batches(data_dir, lang, tok, 4, 3, split="select")
        assert ppl[2, j] != pytest.approx(evaluate(model, select)["perplexity"], rel=1e-4)  # not the selection half
    # a bootstrap interval around every cell
    interval = np.array(doc["perplexity_interval"])
    assert interval.shape == (3, 2, 2)
    assert (interval[..., 0] < ppl).all() and (ppl < interval[..., 1]).all()
    assert doc["interval"]["level"] == 0.95 and doc["interval"]["resamples"] == 1000

    # size-matched random masks: rows = the masks' languages, 3 seeds derived from the job seed
    rnd = doc["random"]
    assert rnd["rows"] == ["en", "de"] and rnd["cols"] == ["en", "de"]
    assert rnd["seeds"] == random_mask_seeds(21, 3)
    by_seed = np.array(rnd["perplexity_by_seed"])
    assert by_seed.shape == (2, 3, 2)
    np.testing.assert_allclose(by_seed[0], ppl[[0, 0, 0]], rtol=1e-6)  # an all-ones mask has one random match
    for r, seed in enumerate(rnd["seeds"]):  # the de row's random masks, recomputed from the documented seeds
        random_mask = size_matched_random_mask(pruned, np.random.default_rng([seed, zlib.crc32(b"de")]))
        np.testing.assert_array_equal(random_mask.sum(axis=1), pruned.sum(axis=1))
        with HeadGates(model, random_mask):
            expected = evaluate(model, language_eval_batches(data_dir, "en", tok, 4, 3, split="report"))
        assert by_seed[1, r, 0] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert len(set(by_seed[1, :, 0])) > 1  # the seeds give different masks
    np.testing.assert_allclose(rnd["perplexity_mean"], by_seed.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(rnd["perplexity_std"][1], by_seed[1].std(axis=0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(rnd["perplexity_min"], by_seed.min(axis=1))
    np.testing.assert_allclose(rnd["perplexity_max"], by_seed.max(axis=1))
    np.testing.assert_allclose(rnd["relative_to_random"], ppl[:2] / by_seed.mean(axis=1), rtol=1e-9)
    assert rnd["heads_kept_per_layer"] == {"en": [4, 4], "de": [2, 3]}
    assert ctx.logged()["relative_to_random/de/en"] == pytest.approx(rnd["relative_to_random"][1][0])
    np.testing.assert_array_equal(ppl[0], ppl[2])  # an all-ones mask is the full model (evaluated once)
    assert doc["full_model_row"] == {"source": "computed", "model": "test.model:v0",
                                     "reason": "no producer record of test.model:v0 upstream of this job"}
    # forward passes: the distinct gated masks (de's and its random masks) and the full model, on both columns
    gated = {pruned.tobytes()} | {
        size_matched_random_mask(pruned, np.random.default_rng([seed, zlib.crc32(b"de")])).tobytes() for seed in rnd["seeds"]
    }
    assert meta["full_model_row"] == "computed" and meta["forward_cells"] == (len(gated) + 1) * 2
    assert not np.allclose(ppl[1], ppl[2], rtol=1e-3)  # masking 3 heads changes perplexity
    np.testing.assert_allclose(doc["relative_perplexity"][1], ppl[1] / ppl[2], rtol=1e-9)

    rows = list(csv.reader((out / "cross_eval.csv").read_text().splitlines()))
    assert rows[0] == ["subnetwork", "en", "de"]
    assert [r[0] for r in rows[1:]] == ["en", "de", "full"]
    np.testing.assert_allclose(np.array([[float(x) for x in r[1:]] for r in rows[1:]]), ppl)
    assert ctx.logged()["perplexity/de/en"] == pytest.approx(ppl[1, 0])


def test_a_mask_keeping_every_head_is_the_ungated_model_bit_for_bit(tmp_path):
    from test_prune import make_tiny_study

    from stages.gating import HeadGates
    from stages.mlm import evaluate_chunks, language_eval_batches, load_model, load_tokenizer

    assert mask_key(None) is None and mask_key(np.ones((2, 4))) is None
    assert mask_key(A) == A.tobytes() and mask_key(A.astype(np.float64)) == A.tobytes()
    model_dir, data_dir = make_tiny_study(tmp_path / "study", languages=("en",), n_test=8)
    model = load_model(model_dir).eval()
    batches = language_eval_batches(data_dir, "en", load_tokenizer(model_dir), 4, 3, split="report")
    plain = evaluate_chunks(model, batches)
    with HeadGates(model, np.ones((2, 4), np.float32)):
        gated = evaluate_chunks(model, batches)
    np.testing.assert_array_equal(gated.loss_sum, plain.loss_sum)  # gates of 1.0: the same bits
    np.testing.assert_array_equal(gated.tokens, plain.tokens)


def test_cross_eval_reads_only_the_reporting_half_and_can_skip_random_masks(tmp_path):
    from test_prune import make_tiny_study

    model_dir, data_dir = make_tiny_study(tmp_path / "study", languages=("en", "de"), n_test=4)
    mask = np.ones((2, 4), np.float32)
    mask[1, :2] = 0
    masks = [make_input(write_mask(tmp_path / "m_en", mask, "en"), "head-mask")]

    def run(data, name, **params):
        inputs = {"model": make_input(model_dir, "model"), "dataset": make_input(data, "dataset"), "masks": masks}
        run_stage(CROSS_EVAL, {"eval_batch_size": 4, **params}, FakeContext(tmp_path / name), inputs)
        return json.loads((tmp_path / name / "outputs" / "metrics" / "cross_eval.json").read_text())

    no_select = tmp_path / "no_select"
    shutil.copytree(data_dir, no_select)
    for lang in ("en", "de"):
        shutil.rmtree(no_select / lang / "select")
    full = run(data_dir, "full", random_mask_seeds=1)
    alone = run(no_select, "alone", random_mask_seeds=0)
    assert "random" not in alone and alone["perplexity"] == full["perplexity"]
    assert full["random"]["perplexity_std"] == [[None, None]]  # one seed: no spread, written as null
    with pytest.raises(ValueError, match="has no en/select"):
        run(no_select, "sel", split="select")


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
