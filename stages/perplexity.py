"""Perplexity from per-chunk masked-LM losses, and its percentile-bootstrap interval.

:func:`stages.mlm.evaluate_chunks` keeps each evaluated chunk's summed loss and masked-token count
(:class:`ChunkLosses`), so that :func:`bootstrap_perplexity_interval` can put a percentile-bootstrap
interval on a perplexity without another forward pass: resample the chunks with replacement,
recompute ``exp(sum(loss) / sum(tokens))``. The caller seeds the resamples
(:func:`stages.mlm.bootstrap_seed`: by ``(eval_seed, language)`` only, so two models evaluated on one
language are resampled identically: paired intervals).

Cheap to import: numpy and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BOOTSTRAP_RESAMPLES = 1000
DEFAULT_INTERVAL_LEVEL = 0.95


def _perplexity(loss: float) -> float:
    """exp(loss), infinite beyond float range."""
    return math.exp(loss) if loss < 700 else math.inf


@dataclass(frozen=True)
class ChunkLosses:
    """What :func:`stages.mlm.evaluate_chunks` measures: each evaluated chunk's summed masked-token loss and
    masked-token count, in chunk order."""

    loss_sum: np.ndarray  # float64 [n_chunks]
    tokens: np.ndarray  # int64 [n_chunks]

    def summary(self) -> dict[str, float]:
        """``{"loss": token-weighted mean, "perplexity": exp(loss), "tokens"}``."""
        total = int(self.tokens.sum())
        if total == 0:
            raise ValueError("evaluate: the batches contain no masked tokens")
        mean = float(self.loss_sum.sum()) / total
        return {"loss": mean, "perplexity": _perplexity(mean), "tokens": float(total)}

    def perplexity_interval(
        self, seed: Sequence[int] | int, resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES, level: float = DEFAULT_INTERVAL_LEVEL
    ) -> tuple[float, float]:
        """:func:`bootstrap_perplexity_interval` of these chunks."""
        return bootstrap_perplexity_interval(self.loss_sum, self.tokens, seed=seed, resamples=resamples, level=level)


def bootstrap_perplexity_interval(
    loss_sum: np.ndarray,
    tokens: np.ndarray,
    *,
    seed: Sequence[int] | int,
    resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES,
    level: float = DEFAULT_INTERVAL_LEVEL,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the perplexity ``exp(sum(loss_sum) / sum(tokens))``.

    Each of ``resamples`` resamples draws ``n`` chunks with replacement (numpy generator seeded with
    ``seed``) and recomputes the token-weighted perplexity; the interval is the ``(1 - level) / 2``
    and ``(1 + level) / 2`` quantiles. Chunks are the resampled unit: chunks cut from one document
    are not independent, so the interval is, if anything, too narrow. Resamples without a masked
    token are left out.
    """
    loss_sum = np.asarray(loss_sum, dtype=np.float64).reshape(-1)
    tokens = np.asarray(tokens, dtype=np.float64).reshape(-1)
    if loss_sum.shape != tokens.shape:
        raise ValueError(f"loss_sum has {loss_sum.size} chunks, tokens {tokens.size}; pass one value per chunk")
    if tokens.sum() <= 0:
        raise ValueError("bootstrap: the chunks contain no masked tokens")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap needs resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, loss_sum.size, size=(resamples, loss_sum.size))
    tok = tokens[idx].sum(axis=1)
    ok = tok > 0
    ppl = np.exp(np.minimum(loss_sum[idx].sum(axis=1)[ok] / tok[ok], 700.0))
    lo, hi = np.quantile(ppl, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)
