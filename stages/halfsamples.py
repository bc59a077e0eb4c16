"""Intervals of the similarity measures: half-samples of the sentences, and paired differences.

The half-sample values come from per-representation Gram matrices (:class:`stages.resampling.Gram`)
summed over groups of sentences (:class:`HalfSamples`), so a half-sample never repeats a d x d product.
The half-samples (and isomorphism subsets) are functions of a seed, drawn once per run by the caller and
reused for every model, pair and layer: that is what makes a paired difference paired. The floors are
:mod:`stages.resampling`'s.

Spread (``spread``): an interval per pair, layer and model for ``cka``, ``cka_debiased``, ``rsa``
and ``isomorphism``. For the first three, **half-sampling** over sentences (``bootstrap`` resamples,
``confidence`` coverage): the sentences are split at random into up to 100 groups of equal size (give
or take one); each resample keeps a random half of the groups (``bootstrap / 2`` random halves and
their complements), the same sentences in every language; the measure is recomputed on each
half-sample; the interval is the full-sample value plus the ``(1 +- confidence) / 2`` percentiles of
the half-sample values' deviations from their mean, each deviation scaled by ``sqrt(m / (n - m))``
(m sentences kept; the factor is 1 at m = n / 2). Why half-samples and not the usual bootstrap: a
bootstrap resample repeats sentences, and each copy pair of a repeated sentence puts that sentence's
squared norms (diagonal values) off the diagonal of both languages' Gram matrices, at the same
place: the "unbiased" HSIC estimator, which drops only the diagonal, is then biased upwards (and
biased CKA more). Sampling half the sentences without replacement repeats nothing; its variance
around the full-sample value, (1/m - 1/n) sigma^2, equals the full sample's sampling variance
sigma^2 / n at m = n / 2 (the finite-population argument behind the delete-d jackknife with
d = n / 2). Recentring on the half-sample mean removes the size-dependent bias of biased CKA
(larger at n / 2 than at n). The half-sample values come from per-(language, layer) Gram matrices
summed over the groups, so B resamples cost O(n^2) per pair plus O(n G B) per language, not B
recomputations. For ``rsa_method="spearman"`` the half-samples keep the full sample's ranks (a
re-ranking within each half is not computed). For ``isomorphism``: ``isomorphism_resamples`` other
seeded subsets of the same size m drawn from the n sentences; the interval is the value +- z sd,
the sd of those subsets' scores divided by sqrt(1 - m/n) (finite-population correction: subsets
of one corpus overlap), the lower end cut at 0; null when m = n (every subset is the same).
``bootstrap: 0`` switches every spread off, ``floor_seeds: 0`` the floors.

Paired differences (``spread_difference``): the interval of ``<model> - full`` (subnetwork, base,
random), per pair, layer and measure, from the **same** resamples as ``spread``: the half-samples (and
isomorphism subsets) are drawn once per run, so half-sample k keeps the same sentences for every model;
the difference of the two models' values on each half-sample goes through the same interval rule, around
the difference of the full-sample values (:func:`difference_interval`; for isomorphism the differences of
the subset scores, +- z sd, not cut at 0). Both models are measured on the same sentences (for the
subnetwork model too: a's sentences through a's subnetwork, b's through b's), so much of the sampling
noise (which verses were drawn) moves both values alike and cancels in the difference; adding the two
models' half-widths in quadrature, as if they were independent, overstates the difference's uncertainty.
Cost: each model keeps its per-(pair, layer, measure) half-sample values (B floats each) until it is
paired with the full model (computed first), then a subtraction and two percentiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.resampling import Gram, RdmStats, SeedLike, gram

if TYPE_CHECKING:
    import numpy as np

SPREAD_GROUPS = 100  # sentence groups of the half-samples (fewer when there are fewer sentences)


# --------------------------------------------------------------------------------------------------
# Half-samples of sentence groups, evaluated from Gram matrices
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HalfSamples:
    """Half-samples of n sentences: random groups, and for each resample half of them.

    Rows of ``weights`` (and of every Gram matrix built for these half-samples) are in ``order``:
    position p is sentence ``order[p]``. The groups are consecutive positions: with G groups, the
    first ``n % G`` hold ``n // G + 1`` sentences, the others ``n // G``. Columns come in
    complementary pairs (2b, 2b+1).
    """

    order: np.ndarray  # [n] sentence indices, grouped
    choice: np.ndarray  # [G, B] float 0/1: the groups each half-sample keeps
    weights: np.ndarray  # [n, B] float 0/1: the sentences (positions) each half-sample keeps
    sizes: np.ndarray  # [B] sentences kept by each half-sample

    @property
    def n(self) -> int:
        return int(self.order.shape[0])

    def members(self, b: int) -> np.ndarray:
        """The sentence indices (corpus order) that half-sample ``b`` keeps."""
        import numpy as np

        return np.sort(self.order[self.weights[:, b] > 0])

    def quad(self, blocks: np.ndarray) -> np.ndarray:
        """``w_b^T M w_b`` for every half-sample b, from the group sums ``blocks`` [G, G] of M."""
        import numpy as np

        return np.einsum("gb,gb->b", self.choice, blocks @ self.choice)

    def group_sums(self, m: np.ndarray) -> np.ndarray:
        """Sums of the rows of ``m`` [n, ...] (rows in ``order``) over each group: [G, ...]. The first
        ``n % G`` groups hold one sentence more than the others, so two reshapes do it (several times
        faster than ``np.add.reduceat``)."""
        import numpy as np

        g, n = self.choice.shape[0], self.n
        small, big = divmod(n, g)
        cut = big * (small + 1)
        rest = m.shape[1:]
        parts = [m[:cut].reshape(big, small + 1, *rest).sum(axis=1), m[cut:].reshape(g - big, small, *rest).sum(axis=1)]
        return np.concatenate(parts)

    def _group_sums_of_product(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """:meth:`group_sums` of ``a o b`` ([n, n] each), summed as it is multiplied (einsum)."""
        import numpy as np

        g, n = self.choice.shape[0], self.n
        small, big = divmod(n, g)
        cut = big * (small + 1)
        parts = [np.einsum("gsn,gsn->gn", a[:cut].reshape(big, small + 1, n), b[:cut].reshape(big, small + 1, n)),
                 np.einsum("gsn,gsn->gn", a[cut:].reshape(g - big, small, n), b[cut:].reshape(g - big, small, n))]
        return np.concatenate(parts)

    def block_sums(self, m: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
        """Sums of an [n, n] matrix (rows and columns in ``order``) over every pair of groups: [G, G];
        with ``other``, of the elementwise product ``m o other`` (without forming it)."""
        import numpy as np

        rows = self.group_sums(m) if other is None else self._group_sums_of_product(m, other)  # [G, n]
        g = rows.shape[0]
        small, big = divmod(self.n, g)
        cut = big * (small + 1)
        # a sum over a short last axis is slow in numpy; a matrix-vector product with ones is not
        parts = [np.ascontiguousarray(rows[:, :cut]).reshape(g * big, small + 1) @ np.ones(small + 1),
                 np.ascontiguousarray(rows[:, cut:]).reshape(g * (g - big), small) @ np.ones(small)]
        return np.concatenate([parts[0].reshape(g, big), parts[1].reshape(g, g - big)], axis=1)


def half_samples(n: int, resamples: int, seed: SeedLike, groups: int = SPREAD_GROUPS) -> HalfSamples:
    """``resamples`` half-samples of ``n`` sentences: the sentences are split at random into G groups
    (G = ``groups``, at most n, made even; sizes differ by at most 1), and each resample keeps G/2 of
    them, chosen at random; every second resample is the complement of the one before."""
    import numpy as np

    if resamples < 2 or resamples % 2:
        raise ValueError(f"bootstrap: use an even number of half-samples, at least 2 (got {resamples})")
    g = min(groups, n)
    g -= g % 2
    if g < 2:
        raise ValueError(f"half-samples need at least 2 sentences, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    sizes = np.full(g, n // g)
    sizes[: n % g] += 1
    halves = (np.argsort(rng.random((g, resamples // 2)), axis=0) < g // 2).astype(np.float64)
    choice = np.empty((g, resamples))
    choice[:, 0::2], choice[:, 1::2] = halves, 1.0 - halves
    weights = np.repeat(choice, sizes, axis=0)
    return HalfSamples(order, choice, weights, weights.sum(axis=0))


@dataclass(frozen=True)
class GramStats:
    """What one representation contributes to the CKA of every half-sample: its :class:`Gram` (rows in
    the half-samples' order) and, per half-sample b with 0/1 weights w_b, ``K w_b``, ``w_b^T K w_b``,
    ``w_b . diag(K)`` and its own two HSIC numerators on the half-sample."""

    base: Gram
    kw: np.ndarray  # [n, B] K w_b
    wk: np.ndarray  # [n, B] w_b o K w_b (the rows outside the half-sample zeroed)
    wkw: np.ndarray  # [B]
    wdiag: np.ndarray  # [B]
    self_biased: np.ndarray  # [B] ||Xc_S^T Xc_S||_F^2 (S centred on itself)
    self_unbiased: np.ndarray  # [B] m(m-3) HSIC_u(X_S, X_S)


def _subset_hsic(
    a: GramStats, b: GramStats, hs: HalfSamples, blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per half-sample S (weights w, m sentences): the biased and the m(m-3)-scaled unbiased HSIC
    numerators of X_S, Y_S, from the group sums ``blocks`` of ``K o L`` (elementwise product).

    Biased: the centred cross product on S is ``X^T P Y`` with ``P = diag(w) - w w^T / m``, so
    ``||X^T P Y||_F^2 = tr(P K P L) = w^T (K o L) w - 2/m sum_j w_j (Kw)_j (Lw)_j + (w^T K w)(w^T L w) / m^2``.
    Unbiased (Song et al. 2012 on S, diagonals dropped): ``tr(K~L~) = w^T (K o L) w - sum_S k_j l_j``,
    ``1^T K~ 1 = w^T K w - sum_S k_j`` and ``1^T K~ L~ 1 = sum_S ((Kw)_j - k_j)((Lw)_j - l_j)``.
    """
    import numpy as np

    m = hs.sizes
    wew = hs.quad(blocks)
    cross3 = np.einsum("nb,nb->b", a.wk, b.kw)
    kl = (a.base.diag * b.base.diag) @ hs.weights
    biased = wew - 2.0 * cross3 / m + a.wkw * b.wkw / m**2
    tr_kl = wew - kl
    s_k, s_l = a.wkw - a.wdiag, b.wkw - b.wdiag
    k1l1 = cross3 - b.base.diag @ a.wk - a.base.diag @ b.wk + kl
    with np.errstate(divide="ignore", invalid="ignore"):
        unbiased = tr_kl + s_k * s_l / ((m - 1) * (m - 2)) - 2.0 * k1l1 / (m - 2)
    return biased, np.where(m >= 4, unbiased, np.nan)


def gram_stats(x: Any, hs: HalfSamples) -> GramStats:
    """:class:`GramStats` of ``x`` [n, d] (or of its :class:`Gram`, rows already in ``hs.order``)."""
    import numpy as np

    g = x if isinstance(x, Gram) else gram(x, hs.order)
    kw = hs.group_sums(g.k).T @ hs.choice  # K w_b: K's (symmetric) sums over each group, then the chosen groups
    wk = hs.weights * kw
    partial = GramStats(g, kw, wk, wk.sum(axis=0), g.diag @ hs.weights, np.empty(0), np.empty(0))
    biased, unbiased = _subset_hsic(partial, partial, hs, hs.block_sums(g.k, g.k))
    return GramStats(g, kw, wk, partial.wkw, partial.wdiag, biased, unbiased)


def _ratios(num: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import numpy as np

    ok = (a > 0) & (b > 0) & np.isfinite(num)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, num / np.sqrt(np.where(ok, a * b, 1.0)), np.nan)


def subset_cka(a: GramStats, b: GramStats, hs: HalfSamples) -> tuple[np.ndarray, np.ndarray]:
    """(linear CKA, debiased linear CKA) of X and Y restricted to each half-sample: two arrays [B]."""
    biased, unbiased = _subset_hsic(a, b, hs, hs.block_sums(a.base.k, b.base.k))
    return _ratios(biased, a.self_biased, b.self_biased), _ratios(unbiased, a.self_unbiased, b.self_unbiased)


def rdm_stats(z: np.ndarray | None, hs: HalfSamples | None) -> RdmStats | None:
    """:class:`RdmStats` of a prepared square RDM (:func:`rdm_square`; None if constant) whose rows
    are in ``hs.order``, with the half-sample sums (none without ``hs``)."""
    if z is None:
        return None
    if hs is None:
        return RdmStats(z)
    return RdmStats(z, 0.5 * hs.quad(hs.block_sums(z)), 0.5 * hs.quad(hs.block_sums(z, z)))


def subset_rsa(a: RdmStats | None, b: RdmStats | None, hs: HalfSamples) -> np.ndarray:
    """Pearson correlation of two RDMs over the sentence pairs of each half-sample: an array [B]
    (NaN for a constant RDM)."""
    import numpy as np

    if a is None or b is None or a.total is None or b.total is None or a.square is None or b.square is None:
        return np.full(hs.choice.shape[1], np.nan)
    m = hs.sizes
    pairs = m * (m - 1) / 2.0
    cross = 0.5 * hs.quad(hs.block_sums(a.z, b.z))
    cov = cross - a.total * b.total / pairs
    return _ratios(cov, a.square - a.total**2 / pairs, b.square - b.total**2 / pairs)


def half_sample_interval(
    point: float, values: np.ndarray, hs: HalfSamples, confidence: float
) -> tuple[float, float] | None:
    """``point`` plus the ``(1 -+ confidence) / 2`` percentiles of the half-sample values' deviations
    from their mean, each scaled by ``sqrt(m / (n - m))``; None if any value is not finite."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if not math.isfinite(point) or not np.isfinite(values).all():
        return None
    m = hs.sizes
    dev = np.sort((values - values.mean()) * np.sqrt(m / (hs.n - m)))
    alpha = 1.0 - confidence
    pos = np.array([alpha / 2, 1 - alpha / 2]) * (len(dev) - 1)  # np.quantile's linear rule, without its overhead
    below = np.floor(pos).astype(int)
    above = np.minimum(below + 1, len(dev) - 1)
    lo, hi = dev[below] + (pos - below) * (dev[above] - dev[below])
    return point + float(lo), point + float(hi)


def isomorphism_interval(
    point: float, values: np.ndarray, *, m: int, n: int, confidence: float, distance: bool = True
) -> tuple[float, float] | None:
    """``point +- z sd``: sd of the scores of other random m-subsets of the n sentences, divided by
    sqrt(1 - m/n) (subsets of one corpus overlap: the finite-population correction), the lower end cut
    at 0 when ``point`` is a distance (not for a difference of two distances, ``distance=False``).
    None when every subset is the same (m >= n), with fewer than 2 subsets, or with a non-finite score."""
    import statistics

    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if m >= n or len(values) < 2 or not math.isfinite(point) or not np.isfinite(values).all():
        return None
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    sd = float(np.std(values, ddof=1)) / math.sqrt(1.0 - m / n)
    return (max(0.0, point - z * sd) if distance else point - z * sd), point + z * sd


def difference_interval(
    point_a: float, values_a: np.ndarray, point_b: float, values_b: np.ndarray, hs: HalfSamples, confidence: float
) -> tuple[float, float] | None:
    """Paired half-sample interval of ``a - b``, two measures computed on the same sentences (two models,
    the same pair of languages): ``values_a[k]`` and ``values_b[k]`` come from the same half-sample k, so
    the interval is :func:`half_sample_interval` of the differences ``values_a - values_b`` around
    ``point_a - point_b``. Whatever the sentences drawn do to both measures alike (here most of the
    noise: which verses, how long, how hard) cancels in the difference; adding the two intervals'
    half-widths in quadrature treats the two as independent and is much wider when they are not."""
    import numpy as np

    return half_sample_interval(point_a - point_b, np.asarray(values_a) - np.asarray(values_b), hs, confidence)


def bootstrap_description(hs: HalfSamples | None, resamples: int, confidence: float) -> dict[str, Any]:
    """The ``bootstrap`` entry of similarity.json."""
    if hs is None:
        return {"resamples": 0, "confidence": confidence, "unit": "sentences", "method": "none (bootstrap: 0)"}
    return {
        "resamples": resamples, "confidence": confidence, "unit": "sentences", "groups": int(hs.choice.shape[0]),
        "method": (
            f"half-sampling without replacement: the sentences split at random into {hs.choice.shape[0]} groups, "
            f"each resample keeps half of the groups ({resamples // 2} random halves and their complements), "
            "the same sentences in every language; interval = full-sample value + the percentiles of the "
            "half-sample values' deviations from their mean, scaled by sqrt(m / (n - m)); no sentence repeated, "
            "so debiased CKA stays unbiased; spearman RSA keeps the full sample's ranks"
        ),
    }
