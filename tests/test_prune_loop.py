"""The one-pass pruning loop (``stages.prune_loop.iterative_prune`` with ``stages.prune.gated_pass``)
against a faithful two-pass loop, written here as the stage ran it before issue 17 and as the issue
describes run_bertology's: P0 by a scoring forward, then per step an importance pass under the
current mask and a separate scoring forward under the new mask. Same final masks, same per-step
perplexities and importances: with fake measurements, and on a tiny real XLM-R."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_prune import _tiny_batches, make_tiny_study  # noqa: E402

from stages.prune_loop import heads_per_step, iterative_prune, next_mask, normalize_importance  # noqa: E402


def two_pass_prune(n_layers, n_heads, importance_fn, perplexity_fn, threshold, masking_amount, min_heads=1,
                   normalize_over="all"):
    """The reference loop: ``(mask, [(step, heads_kept, perplexity, accepted)], importances, stop)``."""
    mask = np.ones((n_layers, n_heads), np.float32)
    k = heads_per_step(n_layers, n_heads, masking_amount)
    p0 = float(perplexity_fn(mask.copy()))
    limit = p0 * threshold
    trajectory, imps, stop = [(0, int(mask.sum()), p0, True)], [], ""
    while True:
        if int(mask.sum()) - k < min_heads:
            stop = "min_heads"
            break
        imp = normalize_importance(importance_fn(mask.copy()), mask=mask, over=normalize_over)
        imps.append(imp)
        candidate = next_mask(mask, imp, k)
        ppl = float(perplexity_fn(candidate.copy()))
        accepted = math.isfinite(ppl) and ppl <= limit
        trajectory.append((len(trajectory), int(candidate.sum()), ppl, accepted))
        if not accepted:
            stop = "threshold"
            break
        mask = candidate
    return mask, trajectory, np.stack(imps) if imps else np.zeros((0, n_layers, n_heads)), stop


def one_pass(n_layers, n_heads, importance_fn, perplexity_fn, threshold, masking_amount, min_heads=1,
             normalize_over="all"):
    """``iterative_prune`` with a measurement counting its calls: ``(result, [(heads, want_importance)])``."""
    calls = []

    def measure(mask, want):
        calls.append((int(mask.sum()), want))
        return perplexity_fn(mask), importance_fn(mask) if want else None

    res = iterative_prune(n_layers, n_heads, measure, threshold, masking_amount, min_heads, normalize_over=normalize_over)
    return res, calls


def _as_tuples(res):
    return [(s.step, s.heads_kept, s.perplexity, s.accepted) for s in res.trajectory]


def _fake_model(seed, n_layers=4, n_heads=6):
    """An importance and a perplexity that depend on the whole mask (not only on how many heads it keeps)."""
    rng = np.random.default_rng(seed)
    weight = rng.random((n_layers, n_heads))
    inter = rng.random((n_layers * n_heads, n_layers * n_heads)) * 0.1

    def importance(mask):
        flat = mask.reshape(-1)
        return (weight.reshape(-1) + inter @ flat).reshape(mask.shape) * (0.5 + 0.5 * mask)

    def perplexity(mask):
        off = 1.0 - mask.reshape(-1)
        return 20.0 + 3.0 * float(weight.reshape(-1) @ off) + float(off @ inter @ off)

    return importance, perplexity


@pytest.mark.parametrize(
    ("threshold", "masking_amount", "min_heads", "over"),
    [
        (1e9, 0.1, 1, "all"),  # never rejected: down to min_heads
        (1e9, 0.25, 7, "kept"),
        (1.05, 0.1, 1, "all"),  # a few steps, then rejected
        (1.2, 0.1, 1, "kept"),
        (1.001, 0.25, 1, "all"),  # the first step rejected
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_pass_equals_two_pass_on_fake_measurements(seed, threshold, masking_amount, min_heads, over):
    importance, perplexity = _fake_model(seed)
    mask, traj, imps, stop = two_pass_prune(4, 6, importance, perplexity, threshold, masking_amount, min_heads, over)
    res, calls = one_pass(4, 6, importance, perplexity, threshold, masking_amount, min_heads, over)
    np.testing.assert_array_equal(res.mask, mask)
    assert _as_tuples(res) == traj
    np.testing.assert_array_equal(res.importances, imps)
    assert res.stop_reason.startswith(stop)
    # one measurement per trajectory point; the importance skipped only where no step can follow
    k = heads_per_step(4, 6, masking_amount)
    assert [heads for heads, _ in calls] == [t[1] for t in traj]
    assert [want for _, want in calls] == [heads - k >= min_heads for heads, _ in calls]


def test_the_cases_cover_both_stops():
    stops = set()
    for seed in (0, 1, 2):
        importance, perplexity = _fake_model(seed)
        for threshold, amount in ((1e9, 0.1), (1.05, 0.1), (1.001, 0.25)):
            _, traj, _, stop = two_pass_prune(4, 6, importance, perplexity, threshold, amount)
            stops.add((stop, len(traj) > 2))
    assert {("min_heads", True), ("threshold", True), ("threshold", False)} <= stops


# --------------------------------------------------------------------------------------------------
# On a tiny real model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from stages.mlm import load_model

    model_dir, data_dir = make_tiny_study(tmp_path_factory.mktemp("tiny_loop"))
    return load_model(model_dir).eval(), _tiny_batches(model_dir, data_dir, n=16, batch_size=8, seed=7)


def _two_pass_on_model(model, batches, threshold, masking_amount):
    """The faithful loop with the stage's previous passes: head_importance, then evaluate."""
    from stages.gating import HeadGates, gate_shape
    from stages.mlm import evaluate
    from stages.prune import head_importance

    with HeadGates(model) as gates:

        def importance_fn(mask):
            gates.set(mask)
            return head_importance(model, gates, batches)

        def perplexity_fn(mask):
            gates.set(mask)
            return evaluate(model, batches)["perplexity"]

        return two_pass_prune(*gate_shape(model), importance_fn, perplexity_fn, threshold, masking_amount)


def test_gated_pass_is_evaluate_and_head_importance_in_one(tiny):
    """Bit for bit on CPU: the pass's forward is evaluate's, its gradient head_importance's."""
    from stages.gating import HeadGates
    from stages.mlm import evaluate
    from stages.prune import gated_pass, head_importance

    model, batches = tiny
    rng = np.random.default_rng(3)
    with HeadGates(model) as gates:
        for mask in (np.ones((2, 4), np.float32), (rng.random((2, 4)) > 0.4).astype(np.float32)):
            gates.set(mask)
            both = gated_pass(model, gates, batches)
            assert both.perplexity == evaluate(model, batches)["perplexity"]
            np.testing.assert_array_equal(both.importance, head_importance(model, gates, batches))
            alone = gated_pass(model, gates, batches, importance=False)
            assert alone.importance is None and alone.perplexity == both.perplexity
            np.testing.assert_array_equal(alone.losses.loss_sum, both.losses.loss_sum)
            np.testing.assert_array_equal(gates.mask(), mask)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_prune_model_equals_the_two_pass_loop_on_a_tiny_model(tiny):
    """Down to min_heads, then with a threshold that rejects a step part-way: identical masks,
    trajectories (perplexities bit for bit) and importances."""
    from stages.prune import prune_model

    model, batches = tiny
    mask, traj, imps, stop = _two_pass_on_model(model, batches, 1e6, 0.1)
    res = prune_model(model, batches, 1e6, 0.1)
    assert stop == "min_heads" and len(traj) == 8
    np.testing.assert_array_equal(res.mask, mask)
    assert _as_tuples(res) == traj
    np.testing.assert_array_equal(res.importances, imps)

    ppl = [t[2] for t in traj]
    j = next(j for j in range(1, 7) if ppl[j + 1] > max(ppl[: j + 1]))  # a later step that raises the maximum
    threshold = (max(ppl[: j + 1]) + ppl[j + 1]) / 2 / ppl[0]
    mask, traj, imps, stop = _two_pass_on_model(model, batches, threshold, 0.1)
    res = prune_model(model, batches, threshold, 0.1)
    assert stop == "threshold" and [t[3] for t in traj] == [True] * (j + 1) + [False]
    np.testing.assert_array_equal(res.mask, mask)
    assert _as_tuples(res) == traj and res.stop_reason.startswith("threshold")
    np.testing.assert_array_equal(res.importances, imps)
