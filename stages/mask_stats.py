"""Stage ``mask_stats`` (numpy only): how the pruned subnetworks' heads are spread over layers and shared
between languages.

Per layer, the proportion of heads masked (mean over languages of masked/heads **in that layer**; the
original summed the wrong axis), heads kept per language, the share of parameters removed, and the
Jaccard index of the **kept** heads for every pair of languages, with its chance level: the
distribution of the Jaccard index of two independent random masks with the same per-layer head counts
as the pair (:func:`jaccard_chance`, exact: the overlap in a layer is hypergeometric, the total overlap
their convolution), as its mean and 5-95% quantiles. Output ``metrics``: ``mask_stats.json``.

Parameters counted as removed with a masked head (XLM-R/BERT self-attention, per layer, head_dim
d = hidden/heads): the head's d rows of the query, key and value weights and their d bias entries
each, and its d input columns of the attention output projection: ``4*hidden*d + 3*d`` per head.
Not counted: the output projection's bias and the LayerNorm (shared by all heads). Proportions are
given relative to all self-attention parameters (``L * (4*hidden^2 + 4*hidden)``) and, when the
model's parameter count is known (mask.json ``num_parameters`` or the ``total_params`` parameter),
relative to the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageParams, stage
from stages._io import write_json
from stages.formats.masks import MaskInput, mask_inputs
from stages.formats.metrics import MASK_STATS_JSON

CHANCE_QUANTILES = (0.05, 0.95)

# --------------------------------------------------------------------------------------------------
# The statistics (pure numpy)
# --------------------------------------------------------------------------------------------------


def stack_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """``[n_languages, L, H]`` boolean array of kept heads (mask values > 0.5)."""
    arr = np.stack([np.asarray(m, dtype=np.float64) for m in masks])
    if arr.ndim != 3:
        raise ValueError(f"expected [layers, heads] masks, got stacked shape {arr.shape}")
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("head masks must be 0/1")
    return arr > 0.5


def masked_per_layer(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[L]: mean over languages of (masked heads in the layer / heads per layer)."""
    kept = stack_masks(masks)
    return (~kept).mean(axis=2).mean(axis=0)


def masked_per_layer_by_language(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n_languages, L]: masked heads in each layer / heads per layer."""
    return (~stack_masks(masks)).mean(axis=2)


def heads_kept(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n_languages]: number of kept heads."""
    return stack_masks(masks).sum(axis=(1, 2))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of the kept heads of two masks (1.0 when both keep nothing)."""
    ka, kb = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    union = int((ka | kb).sum())
    return 1.0 if union == 0 else int((ka & kb).sum()) / union


def jaccard_matrix(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n, n] Jaccard index of kept heads for every pair of masks (symmetric, diagonal 1)."""
    n = len(masks)
    out = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = jaccard(masks[i], masks[j])
    return out


def kept_per_layer(mask: np.ndarray) -> np.ndarray:
    """[L] number of kept heads (values > 0.5) per layer of a [L, H] mask."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a head mask must be [layers, heads], got shape {arr.shape}")
    return (arr > 0.5).sum(axis=1)


def overlap_distribution(n_heads: int, kept_a: Sequence[int], kept_b: Sequence[int]) -> np.ndarray:
    """P(|A ∩ B| = x), x = 0, 1, ..., for independent uniformly random masks A and B that keep
    ``kept_a[l]`` and ``kept_b[l]`` of the ``n_heads`` heads of layer ``l``.

    In one layer the overlap is hypergeometric, ``C(ka, x) C(H - ka, kb - x) / C(H, kb)``; layers are
    independent, so the total is the convolution of the per-layer distributions.
    """
    pmf = np.ones(1)
    for ka, kb in zip(kept_a, kept_b, strict=True):
        ka, kb = int(ka), int(kb)
        layer = np.array([math.comb(ka, x) * math.comb(n_heads - ka, kb - x) for x in range(min(ka, kb) + 1)], dtype=np.float64)
        pmf = np.convolve(pmf, layer / math.comb(n_heads, kb))
    return pmf


def jaccard_chance(a: np.ndarray, b: np.ndarray, quantiles: tuple[float, float] = CHANCE_QUANTILES) -> tuple[float, float, float]:
    """The Jaccard index of kept heads expected by chance for the pair ``(a, b)``: ``(mean, lo, hi)``
    over two independent random masks with the same per-layer head counts as ``a`` and ``b``.

    Exact, not simulated: with ``Ka``, ``Kb`` heads kept in all and ``X`` the overlap
    (:func:`overlap_distribution`), the index is ``X / (Ka + Kb - X)`` (1 when both keep nothing),
    increasing in ``X``, so its quantiles are those of ``X`` mapped through it; ``lo``/``hi`` are the
    ``quantiles`` (default 5% and 95%; the smallest value whose cumulative probability reaches them).
    """
    ka, kb = kept_per_layer(a), kept_per_layer(b)
    if np.shape(a) != np.shape(b):
        raise ValueError(f"masks of different shapes {np.shape(a)} and {np.shape(b)}")
    pmf = overlap_distribution(int(np.shape(a)[1]), ka.tolist(), kb.tolist())
    x = np.arange(pmf.size, dtype=np.float64)
    union = float(ka.sum() + kb.sum()) - x
    index = np.divide(x, union, out=np.ones_like(x), where=union > 0)
    cdf = np.cumsum(pmf)
    lo, hi = (index[min(int(np.searchsorted(cdf, q - 1e-12)), pmf.size - 1)] for q in quantiles)
    return float(pmf @ index), float(lo), float(hi)


def jaccard_chance_matrix(
    masks: Sequence[np.ndarray], quantiles: tuple[float, float] = CHANCE_QUANTILES
) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [n, n], interval [n, n, 2])`` of :func:`jaccard_chance` for every pair of masks
    (the diagonal: two random masks with the same counts as that one mask)."""
    n = len(masks)
    means = np.zeros((n, n))
    intervals = np.zeros((n, n, 2))
    for i in range(n):
        for j in range(i, n):
            mean, lo, hi = jaccard_chance(masks[i], masks[j], quantiles)
            means[i, j] = means[j, i] = mean
            intervals[i, j] = intervals[j, i] = (lo, hi)
    return means, intervals


def attention_params_per_head(hidden_size: int, num_heads: int) -> int:
    """Parameters removed with one head: Q, K, V rows (+ biases) and output-projection columns."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
    d = hidden_size // num_heads
    return 4 * hidden_size * d + 3 * d


def attention_params_per_layer(hidden_size: int) -> int:
    """Self-attention parameters of one layer: Q, K, V, output projection, weights and biases."""
    return 4 * hidden_size * hidden_size + 4 * hidden_size


def params_removed(mask: np.ndarray, hidden_size: int) -> int:
    """Parameters functionally removed by the masked heads of one mask."""
    mask = np.asarray(mask)
    return int((mask <= 0.5).sum()) * attention_params_per_head(hidden_size, mask.shape[1])


def mask_statistics(
    languages: Sequence[str],
    masks: Sequence[np.ndarray],
    hidden_size: int | None = None,
    total_params: int | None = None,
) -> dict[str, Any]:
    """Everything ``mask_stats`` writes, from the masks (and optionally the model's sizes)."""
    kept = stack_masks(masks)
    n_layers, n_heads = kept.shape[1:]
    jac = jaccard_matrix(masks)
    chance_mean, chance_interval = jaccard_chance_matrix(masks)
    by_lang = masked_per_layer_by_language(masks)
    pair_index = [(i, j) for i in range(len(languages)) for j in range(i + 1, len(languages))]
    pair_jaccards = [float(jac[i, j]) for i, j in pair_index]
    pairs = [
        {
            "a": languages[i],
            "b": languages[j],
            "jaccard": float(jac[i, j]),
            "chance_mean": float(chance_mean[i, j]),
            "chance_interval": [float(v) for v in chance_interval[i, j]],
        }
        for i, j in pair_index
    ]
    stats: dict[str, Any] = {
        "languages": list(languages),
        "num_layers": int(n_layers),
        "num_heads": int(n_heads),
        "total_heads": int(n_layers * n_heads),
        "heads_kept": {lang: int(n) for lang, n in zip(languages, kept.sum(axis=(1, 2)), strict=True)},
        "proportion_heads_masked": {
            lang: float(1 - n / (n_layers * n_heads)) for lang, n in zip(languages, kept.sum(axis=(1, 2)), strict=True)
        },
        "masked_per_layer": masked_per_layer(masks).tolist(),
        "masked_per_layer_by_language": {lang: row.tolist() for lang, row in zip(languages, by_lang, strict=True)},
        "heads_kept_by_all": int(kept.all(axis=0).sum()),
        "heads_kept_by_any": int(kept.any(axis=0).sum()),
        "jaccard": {"labels": list(languages), "matrix": jac.tolist()},
        "jaccard_pairs": pairs,
        "jaccard_min": min(pair_jaccards, default=None),
        "jaccard_max": max(pair_jaccards, default=None),
        "jaccard_mean": float(np.mean(pair_jaccards)) if pairs else None,
        "jaccard_chance": {
            "labels": list(languages),
            "mean": chance_mean.tolist(),
            "interval": chance_interval.tolist(),
            "quantiles": list(CHANCE_QUANTILES),
            "method": (
                "exact distribution of the Jaccard index of two independent uniformly random masks with the "
                "pair's per-layer kept-head counts (per-layer hypergeometric overlaps, convolved over layers); "
                "mean and the 5% and 95% quantiles"
            ),
        },
        "jaccard_chance_mean": float(np.mean([chance_mean[i, j] for i, j in pair_index])) if pairs else None,
        "parameter_counting": (
            "per masked head: its head_dim rows of the query, key and value weights and biases and its head_dim "
            "input columns of the attention output projection (4*hidden*head_dim + 3*head_dim); output-projection "
            "bias and LayerNorm not counted"
        ),
        "hidden_size": hidden_size,
        "total_params": total_params,
    }
    if hidden_size is not None:
        removed = {lang: params_removed(m, hidden_size) for lang, m in zip(languages, masks, strict=True)}
        attn_total = n_layers * attention_params_per_layer(hidden_size)
        stats["params_removed"] = removed
        stats["attention_params"] = attn_total
        stats["proportion_attention_params_removed"] = {k: v / attn_total for k, v in removed.items()}
        if total_params:
            stats["proportion_params_removed"] = {k: v / total_params for k, v in removed.items()}
    return stats


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------


class MaskStatsParams(StageParams):
    """Parameters of the ``mask_stats`` stage."""

    hidden_size: int | None = Field(
        None, ge=1, description="Model hidden size for parameter counts; None: from mask.json (hidden_size)."
    )
    total_params: int | None = Field(
        None, ge=1, description="Model parameter count; None: from mask.json (num_parameters), if any."
    )


@stage(
    "mask_stats",
    params=MaskStatsParams,
    inputs={"masks": Input(type="head-mask", many=True)},
    outputs={"metrics": "metrics"},
    version="2",  # 2: jaccard_chance (size-matched random masks, exact)
)
def mask_stats_stage(params: MaskStatsParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Proportion of heads masked per layer, parameters removed and Jaccard of kept heads per language pair."""
    masks = mask_inputs(inputs)
    langs = [lang for lang, _, _ in masks]
    arrays = [m for _, m, _ in masks]
    hidden = params.hidden_size or _agreed(masks, "hidden_size")
    total = params.total_params or _agreed(masks, "num_parameters")
    stats = mask_statistics(langs, arrays, hidden, total)
    write_json(ctx.output_dir("metrics") / MASK_STATS_JSON, stats)
    ctx.log({f"heads_kept/{lang}": float(n) for lang, n in stats["heads_kept"].items()})
    ctx.log({f"masked_per_layer/{i}": float(v) for i, v in enumerate(stats["masked_per_layer"])})
    keys = ("languages", "heads_kept", "jaccard_min", "jaccard_max", "jaccard_mean", "jaccard_chance_mean")
    meta = {k: stats[k] for k in keys}
    return {"metrics": meta}


def _agreed(masks: Sequence[MaskInput], key: str) -> int | None:
    """The value of ``key`` in the masks' mask.json, when present and the same in all of them."""
    values = {int(info[key]) for _, _, info in masks if info.get(key) is not None}
    if len(values) > 1:
        raise ValueError(f"head masks disagree on {key}: {sorted(values)}; they come from different models")
    return values.pop() if values else None

MASK_STATS: StageDef = mask_stats_stage
