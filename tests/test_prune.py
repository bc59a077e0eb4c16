"""Iterative head pruning: the pure algorithm with fake functions, importance on fake and tiny models,
and the ``prune`` stage end to end on a tiny XLM-R and a tiny dataset directory."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from stages.prune import (
    head_importance,
    heads_per_step,
    iterative_prune,
    next_mask,
    normalize_importance,
)

# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def test_heads_per_step_matches_original():
    assert heads_per_step(12, 12, 0.1) == 14
    assert heads_per_step(2, 4, 0.1) == 1  # int(0.8) = 0 -> at least one
    assert heads_per_step(2, 4, 0.5) == 4


def test_normalize_importance_switches():
    imp = np.array([[1.0, 2.0], [10.0, 30.0]])
    r0, r1 = np.array([1, 2]) / math.sqrt(5), np.array([10, 30]) / math.sqrt(1000)
    by_layer = np.stack([r0, r1])
    np.testing.assert_allclose(normalize_importance(imp, False, False), imp)
    np.testing.assert_allclose(normalize_importance(imp, True, False), by_layer)
    np.testing.assert_allclose(normalize_importance(imp, False, True), (imp - 1) / 29)
    lo, hi = r1[0], r1[1]
    np.testing.assert_allclose(normalize_importance(imp, True, True), (by_layer - lo) / (hi - lo))
    # layer normalisation changes the global order: (1,0) becomes the least important head
    assert np.argmin(normalize_importance(imp, True, True)) == 2
    assert np.argmin(normalize_importance(imp, False, True)) == 0
    # a constant matrix does not divide by zero
    np.testing.assert_array_equal(normalize_importance(np.ones((2, 2)), False, True), np.zeros((2, 2)))


def test_normalize_importance_ignores_masked_heads():
    imp = np.array([[3.0, 4.0, 100.0], [1.0, 1.0, 1.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.float32)
    out = normalize_importance(imp, True, False, mask=mask, over="kept")
    np.testing.assert_allclose(out[0], [0.6, 0.8, 0.0])  # the masked 100 does not enter the norm
    np.testing.assert_allclose(out[1], np.full(3, 1 / math.sqrt(3)))
    out = normalize_importance(imp, True, True, mask=mask, over="kept")
    lo, hi = 1 / math.sqrt(3), 0.8
    np.testing.assert_allclose(out, [[(0.6 - lo) / (hi - lo), 1.0, 0.0], [0.0, 0.0, 0.0]], atol=1e-12)


def test_normalize_importance_over_all_heads_is_the_default_and_run_bertologys():
    """run_bertology: every head's importance (a masked head's gate still has a gradient) enters
    the layer norms and the min-max. Here the masked 100 shrinks its layer's other scores, so
    over all heads the next head masked is in layer 0; over the kept heads it is in layer 1."""
    imp = np.array([[3.0, 4.0, 100.0], [1.0, 1.0, 2.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.float32)
    by_layer = imp / np.sqrt((imp**2).sum(axis=1, keepdims=True))
    expected = (by_layer - by_layer.min()) / (by_layer.max() - by_layer.min())
    np.testing.assert_allclose(normalize_importance(imp, True, True, mask=mask), expected)
    np.testing.assert_allclose(normalize_importance(imp, True, True, mask=mask, over="all"), expected)
    first_all = next_mask(mask, normalize_importance(imp, mask=mask), 1)
    first_kept = next_mask(mask, normalize_importance(imp, mask=mask, over="kept"), 1)
    assert first_all[0].sum() == 1 and first_all[1].sum() == 3
    assert first_kept[0].sum() == 2 and first_kept[1].sum() == 2
    with pytest.raises(ValueError, match="'all' or 'kept'"):
        normalize_importance(imp, over="some")  # type: ignore[arg-type]


def test_next_mask_never_masks_an_already_masked_head():
    mask = np.array([[0, 1, 1], [1, 0, 1]], dtype=np.float32)
    imp = np.array([[-5.0, 3.0, 1.0], [2.0, -9.0, 4.0]])  # masked heads have the lowest scores
    new = next_mask(mask, imp, 2)
    np.testing.assert_array_equal(new, [[0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 0, 1]])  # input untouched
    with pytest.raises(ValueError, match="only 4 remain"):
        next_mask(mask, imp, 5)


def _fake_perplexity(per_masked_head: float, base: float = 10.0):
    return lambda m: base + per_masked_head * float(m.size - m.sum())


def _prune(n_layers, n_heads, importance_fn, perplexity_fn, *args, **kwargs):
    """``iterative_prune`` whose one measurement per mask is an importance and a perplexity function
    (the importance asked for only when the loop wants it)."""
    return iterative_prune(
        n_layers, n_heads, lambda m, want: (perplexity_fn(m), importance_fn(m) if want else None), *args, **kwargs
    )


def test_iterative_prune_stops_at_threshold_and_returns_last_accepted():
    imp = np.arange(144, dtype=float).reshape(12, 12)
    seen: list[np.ndarray] = []

    def importance_fn(mask):
        seen.append(mask.copy())
        return imp

    # P0 = 10, T = 11: 14 masked -> 10.42, 28 -> 10.84 (accepted), 42 -> 11.26 (rejected)
    res = _prune(12, 12, importance_fn, _fake_perplexity(0.03), threshold=1.1, masking_amount=0.1,
                          normalize_layers=False)
    traj = [(s.step, s.heads_kept, round(s.perplexity, 6), s.accepted) for s in res.trajectory]
    assert traj == [(0, 144, 10.0, True), (1, 130, 10.42, True), (2, 116, 10.84, True), (3, 102, 11.26, False)]
    assert res.mask.shape == (12, 12) and res.mask.dtype == np.float32
    assert int(res.mask.sum()) == 116
    expected = np.ones(144, np.float32)
    expected[:28] = 0  # the 28 lowest-importance heads
    np.testing.assert_array_equal(res.mask.reshape(-1), expected)
    assert res.threshold_perplexity == pytest.approx(11.0)
    assert res.perplexity_full == 10.0 and res.perplexity_final == pytest.approx(10.84)
    assert res.importances.shape == (3, 12, 12)  # one importance per attempted step
    # measured under each mask visited, the rejected one included (one pass gives its perplexity and importance)
    assert [int(m.sum()) for m in seen] == [144, 130, 116, 102]
    assert "threshold" in res.stop_reason


def test_iterative_prune_first_step_rejected_keeps_everything():
    res = _prune(12, 12, lambda m: np.ones((12, 12)), _fake_perplexity(1.0), threshold=1.1,
                          masking_amount=0.1)
    assert int(res.mask.sum()) == 144
    assert [(s.heads_kept, s.accepted) for s in res.trajectory] == [(144, True), (130, False)]


def test_iterative_prune_layer_normalisation_changes_choice():
    imp = np.array([[1.0, 2.0], [10.0, 30.0]])
    ppl = _fake_perplexity(0.0)
    kwargs = dict(threshold=1.1, masking_amount=0.25, min_heads=3)  # exactly one step of one head
    a = _prune(2, 2, lambda m: imp, ppl, normalize_layers=True, **kwargs)
    b = _prune(2, 2, lambda m: imp, ppl, normalize_layers=False, **kwargs)
    np.testing.assert_array_equal(a.mask, [[1, 1], [0, 1]])
    np.testing.assert_array_equal(b.mask, [[0, 1], [1, 1]])


def test_iterative_prune_masks_k_new_heads_each_step_and_respects_min_heads():
    rng = np.random.default_rng(0)
    masks: list[np.ndarray] = []

    def importance_fn(mask):
        masks.append(mask.copy())
        out = rng.random((12, 12))
        out[mask == 0] = 0.0  # masked heads look least important: must still never be re-chosen
        return out

    res = _prune(12, 12, importance_fn, _fake_perplexity(0.0), threshold=1.1, masking_amount=0.1)
    # 144 -> 130 -> ... -> 4; masking 14 more would leave fewer than 1 head
    assert [s.heads_kept for s in res.trajectory] == [144 - 14 * i for i in range(11)]
    assert all(s.accepted for s in res.trajectory)
    assert int(res.mask.sum()) == 4 and "min_heads" in res.stop_reason
    for before, after in zip(masks, masks[1:], strict=False):
        assert np.all(after <= before) and int(before.sum() - after.sum()) == 14

    res = _prune(12, 12, importance_fn, _fake_perplexity(0.0), threshold=1.1, masking_amount=0.1,
                          min_heads=20)
    assert int(res.mask.sum()) == 32  # 32 - 14 = 18 < 20
    res = _prune(2, 2, lambda m: np.ones((2, 2)), _fake_perplexity(0.0), threshold=1.1,
                          masking_amount=0.25, min_heads=1)
    assert int(res.mask.sum()) == 1


# --------------------------------------------------------------------------------------------------
# head_importance on a fake model: per-batch accumulation, not the running sum
# --------------------------------------------------------------------------------------------------


def test_head_importance_accumulates_per_batch():
    import torch

    gate = torch.ones(1, 3)

    class Linear(torch.nn.Module):
        """loss = sum(gate * coef): dL/dg = coef, one coefficient row per batch."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, coef, labels):
            return SimpleNamespace(loss=(gate * coef * self.w).sum())

    coefs = [torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[-1.0, 1.0, 0.0]])]
    batches = [{"coef": c, "labels": torch.tensor([[5, -100, 7, 8]])} for c in coefs]  # 3 tokens each
    model = Linear()
    imp = head_importance(model, gate, batches,
                          loss_fn=lambda m, b: (m(**b).loss, int((b["labels"] != -100).sum())))
    # per batch: |1|+|-1| = 2, |1|+|1| = 2, |2|+|0| = 2; the running sum would give 1+0, 1+2, 2+2
    np.testing.assert_allclose(imp, [[2 / 6, 2 / 6, 2 / 6]])
    running = np.array([[1 + 0, 1 + 2, 2 + 2]]) / 6
    assert not np.allclose(imp, running)
    assert model.w.requires_grad and not gate.requires_grad and gate.grad is None  # state restored


# --------------------------------------------------------------------------------------------------
# A tiny study on disk: word-level tokenizer, 2-layer x 4-head XLM-R, random token chunks
# --------------------------------------------------------------------------------------------------

TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "initializer_range": 0.3,  # large weights: heads matter, perplexity moves when they are gated
}
BLOCK = 16


def make_tiny_study(root, languages=("en", "de"), n_test=24, seed=0):
    """``(model_dir, dataset_dir)``: a saved tiny XLMRobertaForMaskedLM with its tokenizer, and a
    dataset artifact (``<lang>/`` with splits train, select, report, written by ``write_language``, +
    meta.json) of random ids, one id range per language; each test half has ``n_test`` chunks, drawn
    independently."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stages.formats.dataset import write_language
    from stages.mlm import build_model

    words = [f"w{i}" for i in range(43)]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=64,
    )
    model_dir = root / "model"
    tok.save_pretrained(model_dir)
    torch.manual_seed(seed)
    model = build_model(TINY_CONFIG, model_dir, block_size=BLOCK)
    model.save_pretrained(model_dir)

    rng = np.random.default_rng(seed)
    data_dir = root / "dataset"
    for i, lang in enumerate(languages):
        lo = 4 + 10 * i  # each language its own 20-id range (overlapping), all inside the vocabulary
        splits = {}
        for split, n in (("train", 4), ("select", n_test), ("report", n_test)):
            chunks = splits[split] = rng.integers(lo, lo + 20, size=(n, BLOCK)).astype(np.int32)
            chunks[:, 0], chunks[:, -1] = 0, 2  # <s> ... </s>
        write_language(data_dir, lang, splits)
    meta = {"languages": list(languages), "block_size": BLOCK, "vocab_size": len(tok), "mask_token_id": 47,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "unk_token_id": 3}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return model_dir, data_dir


def _tiny_batches(model_dir, data_dir, lang="en", n=8, batch_size=4, seed=0):
    from stages.mlm import language_eval_batches, load_tokenizer

    return language_eval_batches(data_dir, lang, load_tokenizer(model_dir), batch_size, seed, max_chunks=n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_study(tmp_path_factory.mktemp("tiny"))


def test_head_importance_on_tiny_model(tiny):
    from stages.gating import HeadGates
    from stages.mlm import load_model

    model_dir, data_dir = tiny
    model = load_model(model_dir)
    batches = _tiny_batches(model_dir, data_dir)
    with HeadGates(model) as gates:
        imp = head_importance(model, gates, batches)
        assert imp.shape == (2, 4) and np.isfinite(imp).all() and (imp > 0).all()
        # the sum of per-batch |grad| over all tokens = token-weighted combination of one-batch importances
        parts = [(head_importance(model, gates, [b]), int((b["labels"] != -100).sum())) for b in batches]
        total = sum(n for _, n in parts)
        np.testing.assert_allclose(imp, sum(p * n for p, n in parts) / total, rtol=1e-6)
        # importance is computed under the current mask: masking a head changes the others' gradients
        mask = np.ones((2, 4), np.float32)
        mask[0, 1] = 0
        gates.set(mask)
        imp_masked = head_importance(model, gates, batches)
        assert not np.allclose(imp_masked, imp)
        np.testing.assert_array_equal(gates.mask(), mask)  # the pass leaves the gate values alone
    assert all(p.requires_grad for p in model.parameters())  # parameter flags restored
    assert not any(p.grad is not None for p in model.parameters())


def _run_prune(tiny, root, **params):
    from stagekit import FakeContext, make_input, run_stage

    from stages.formats.masks import read_mask_dir
    from stages.prune import PRUNE

    model_dir, data_dir = tiny
    ctx = FakeContext(root, seed=5)
    inputs = {"model": make_input(model_dir, "model"), "dataset": make_input(data_dir, "dataset")}
    params = {"language": "en", "max_eval_chunks": 16, "eval_seed": 7, **params}
    meta = run_stage(PRUNE, params, ctx, inputs)["mask"]
    out = root / "outputs" / "mask"
    mask, info = read_mask_dir(out)
    traj = json.loads((out / "trajectory.json").read_text())
    return meta, mask, info, traj, np.load(out / "importance.npy"), ctx


def _replay(importances, n_steps):
    """The mask after ``n_steps`` steps of one head each, from the saved importances."""
    mask = np.ones(importances.shape[1:], np.float32).reshape(-1)
    for step in range(n_steps):
        flat = importances[step].reshape(-1)
        if step > 0:  # normalised over all heads (the default): a masked head keeps a score of its own
            assert np.any(flat[mask == 0] != 0)
        kept = np.flatnonzero(mask)
        mask[kept[np.argmin(flat[kept])]] = 0
    return mask.reshape(importances.shape[1:])


def test_prune_stage_end_to_end(tiny, tmp_path):
    from stages.gating import HeadGates
    from stages.mlm import evaluate, language_eval_batches, load_model, load_tokenizer

    model_dir, data_dir = tiny
    # 1. a threshold never reached: prune down to min_heads, one head per step (int(8 * 0.1) = 0 -> 1)
    meta, mask, info, traj, imp, ctx = _run_prune(tiny, tmp_path / "all", threshold=1e6)
    assert mask.shape == (2, 4) and mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert [t["heads_kept"] for t in traj] == [8, 7, 6, 5, 4, 3, 2, 1] and all(t["accepted"] for t in traj)
    assert meta["heads_kept"] == info["heads_kept"] == int(mask.sum()) == 1 and meta["total_heads"] == 8
    assert meta["stop_reason"].startswith("min_heads") and imp.shape == (7, 2, 4)
    assert info["language"] == "en" and info["mask"] == mask.tolist()
    assert info["hidden_size"] == 32 and info["num_parameters"] > 0
    assert meta["eval_seed"] == 7  # the parameter, not the job seed (5)
    assert meta["normalize_over"] == "all" and info["normalize_over"] == "all"  # recorded with the mask
    assert meta["eval_split"] == "select" and info["eval_split"] == "select"  # decisions: the selection half
    np.testing.assert_array_equal(_replay(imp, 7), mask)
    assert [step for m, step in ctx.metrics if "heads_kept" in m] == list(range(8))
    assert ctx.reported == [(step, 7, "step") for step in range(8)]  # ctx.progress: each step of at most 7
    ppl = [t["perplexity"] for t in traj]

    # 2. a threshold between the running maximum of the first j steps and a later, higher step:
    #    the heads chosen do not depend on the threshold, so the run must stop exactly there
    j = next(j for j in range(7) if ppl[j + 1] > max(ppl[: j + 1]))  # 2 with these seeds
    limit = (max(ppl[: j + 1]) + ppl[j + 1]) / 2
    meta2, mask2, info2, traj2, imp2, _ = _run_prune(tiny, tmp_path / "cut", threshold=limit / ppl[0])
    assert [(t["heads_kept"], t["accepted"]) for t in traj2] == [(8 - i, i <= j) for i in range(j + 2)]
    np.testing.assert_allclose([t["perplexity"] for t in traj2], ppl[: j + 2], rtol=1e-9)
    assert meta2["heads_kept"] == 8 - j == int(mask2.sum())  # the last accepted mask, not the rejected one
    assert meta2["perplexity_final"] == traj2[j]["perplexity"] and meta2["stop_reason"].startswith("threshold")
    np.testing.assert_array_equal(mask2, _replay(imp, j))
    np.testing.assert_allclose(imp2, imp[: j + 1], rtol=1e-6)

    # the reported perplexities are those of the returned mask and of the full model
    model = load_model(model_dir)
    batches = language_eval_batches(data_dir, "en", load_tokenizer(model_dir), 8, 7, max_chunks=16)
    with HeadGates(model, mask2):
        assert evaluate(model, batches)["perplexity"] == pytest.approx(meta2["perplexity_final"], rel=1e-6)
    assert evaluate(model, batches)["perplexity"] == pytest.approx(meta2["perplexity_full"], rel=1e-6)


def test_prune_reads_only_the_half_it_is_given(tiny, tmp_path):
    """Without the report split the default run is unchanged (it reads the selection half only); with
    ``split="report"`` it reads the reporting half and nothing else."""
    import shutil

    from stages.mlm import evaluate, language_eval_batches, load_model, load_tokenizer

    model_dir, data_dir = tiny
    base, _, _, traj, _, _ = _run_prune(tiny, tmp_path / "base", max_eval_chunks=8, threshold=1.05)
    no_report = tmp_path / "no_report"
    shutil.copytree(data_dir, no_report)
    for lang in ("en", "de"):
        shutil.rmtree(no_report / lang / "report")
    meta, _, _, traj2, _, _ = _run_prune((model_dir, no_report), tmp_path / "a", max_eval_chunks=8, threshold=1.05)
    assert traj2 == traj and meta["heads_kept"] == base["heads_kept"]

    no_select = tmp_path / "no_select"
    shutil.copytree(data_dir, no_select)
    for lang in ("en", "de"):
        shutil.rmtree(no_select / lang / "select")
    meta_r, *_ = _run_prune((model_dir, no_select), tmp_path / "b", max_eval_chunks=8, threshold=1.05,
                            split="report")
    assert meta_r["eval_split"] == "report"
    batches = language_eval_batches(data_dir, "en", load_tokenizer(model_dir), 8, 7, max_chunks=8, split="report")
    assert meta_r["perplexity_full"] == pytest.approx(evaluate(load_model(model_dir), batches)["perplexity"], rel=1e-6)
    assert meta_r["perplexity_full"] != pytest.approx(base["perplexity_full"], rel=1e-4)


def test_prune_params_validation():
    from pydantic import ValidationError

    from stages.prune import PruneParams

    assert PruneParams(language="en").threshold == 1.1
    assert PruneParams(language="en").eval_seed == 1234  # the train stage's evaluation seed
    assert PruneParams(language="en").split == "select"  # pruning decisions never see the reporting half
    for bad in ({"threshold": 1.0}, {"masking_amount": 0.0}, {"masking_amount": 1.0}, {"min_heads": 0}):
        with pytest.raises(ValidationError):
            PruneParams(language="en", **bad)
