"""Size-matched random masks: the baseline of ``cross_eval`` for a language's subnetwork.

A subnetwork that keeps fewer heads is worse on every language, so most of an off-diagonal gap can be
size, not language. For each language's mask and each of ``random_mask_seeds`` seeds,
:func:`size_matched_random_mask` draws a mask keeping exactly the same number of heads in every layer,
uniformly at random; ``cross_eval`` evaluates each on every column, and :func:`random_baseline`
summarises them: ``relative_to_random`` = perplexity of the language's own mask / mean perplexity of its
random masks, on the same column (below 1, the chosen heads beat random heads of the same budget).

Seeds: ``seeds = SeedSequence([stage seed, 0x72616E64]).generate_state(random_mask_seeds)`` (the stage
seed is the ``seed`` parameter, else the job's seed); random mask ``r`` of language ``s`` uses
``numpy.random.default_rng([seeds[r], crc32(s)])``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from stages.formats.metrics import json_matrix
from stages.mask_stats import kept_per_layer

RANDOM_MASK_WORD = 0x72616E64  # "rand": keeps the random-mask seeds apart from other uses of the stage seed


def size_matched_random_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 0/1 mask (float32) keeping exactly as many heads in every layer as ``mask`` does.

    The kept heads of each layer are a uniformly random subset of that size (the heads ranked by a
    random permutation drawn from ``rng``); layers that keep all or none of their heads are unchanged.
    """
    counts = kept_per_layer(mask)
    ranks = rng.random(np.shape(mask)).argsort(axis=1).argsort(axis=1)
    return (ranks < counts[:, None]).astype(np.float32)


def random_mask_seeds(stage_seed: int, n: int) -> list[int]:
    """``n`` seeds of the random masks, derived from the stage seed (the first ``k`` do not depend on ``n``)."""
    if n <= 0:
        return []
    words = np.random.SeedSequence([int(stage_seed) & 0xFFFFFFFF, RANDOM_MASK_WORD]).generate_state(n, np.uint32)
    return [int(w) for w in words]


def random_mask_rng(seed: int, language: str) -> np.random.Generator:
    """The generator of one random mask: ``default_rng([seed, crc32(language)])``."""
    return np.random.default_rng([int(seed), zlib.crc32(language.encode("utf-8"))])


def random_baseline(own: np.ndarray, random: np.ndarray) -> dict[str, np.ndarray]:
    """Summaries of the size-matched random masks.

    ``own``: [S, C] perplexity of each language's own mask; ``random``: [S, R, C] perplexity of its
    ``R`` random masks. Returns [S, C] matrices ``perplexity_mean``, ``perplexity_std`` (sample
    standard deviation, ddof 1; NaN when R = 1), ``perplexity_min``, ``perplexity_max`` and
    ``relative_to_random`` = own / mean.
    """
    own = np.asarray(own, dtype=np.float64)
    random = np.asarray(random, dtype=np.float64)
    if random.ndim != 3 or random.shape[0] != own.shape[0] or random.shape[2] != own.shape[1] or not random.shape[1]:
        raise ValueError(f"random perplexities {random.shape} must be [rows, seeds, cols] matching own {own.shape}")
    n = random.shape[1]
    mean = random.mean(axis=1)
    std = random.std(axis=1, ddof=1) if n > 1 else np.full(mean.shape, np.nan)
    return {
        "perplexity_mean": mean,
        "perplexity_std": std,
        "perplexity_min": random.min(axis=1),
        "perplexity_max": random.max(axis=1),
        "relative_to_random": own / mean,
    }


def random_rows(masks: Sequence[tuple[str, np.ndarray]], seeds: Sequence[int]) -> list[tuple[str, np.ndarray | None]]:
    """The size-matched random masks, language by language and seed by seed (``"<lang>#<r>"``)."""
    return [
        (f"{lang}#{r}", size_matched_random_mask(mask, random_mask_rng(seed, lang)))
        for lang, mask in masks
        for r, seed in enumerate(seeds)
    ]


def random_section(
    langs: Sequence[str],
    cols: Sequence[str],
    masks: Sequence[np.ndarray],
    seeds: Sequence[int],
    own: np.ndarray,
    by_seed: np.ndarray,
) -> dict[str, Any]:
    """The ``"random"`` entry of cross_eval.json from the own-mask [S, C] and random [S, R, C] perplexities."""
    summary = random_baseline(own, by_seed)
    return {
        "seeds": list(seeds),
        "rows": list(langs),
        "cols": list(cols),
        "perplexity_by_seed": json_matrix(by_seed),
        **{key: json_matrix(value) for key, value in summary.items()},
        "heads_kept_per_layer": {lang: kept_per_layer(m).tolist() for lang, m in zip(langs, masks, strict=True)},
        "method": (
            "per language mask and seed: a uniformly random mask keeping exactly the same number of heads in every "
            "layer (rng = default_rng([seed, crc32(language)])); perplexity_std is the sample standard deviation "
            "over seeds; relative_to_random = perplexity of the language's own mask / perplexity_mean"
        ),
    }
