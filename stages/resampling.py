"""Floors of the similarity measures: the measure between sentences that are not translations of each other.

Both ask how much of a value is owed to the sentences rather than to the models: a floor breaks the
alignment of translations (b's rows permuted) and measures what is left; an interval recomputes the
measure on other samples of the sentences. The floors and the half-sample intervals are computed from
per-representation Gram matrices ``K = X X^T`` (:class:`Gram`) and their sums over groups of sentences
(:class:`stages.halfsamples.HalfSamples`), so a permutation or a half-sample never repeats a d x d
product: it costs n x n gathers and elementwise products, or group sums (the isomorphism interval
recomputes spectra on other subsets instead). The random draws (length-matched permutations,
half-samples, isomorphism subsets) are functions of a seed, drawn once per run by the caller and reused
for every model, pair and layer: that is what makes a paired difference paired.

Floors (``floors``; not for ``isomorphism``, which ignores the alignment): what a measure gives when
b's rows are permuted, so that the sentences compared are **not** translations of each other, per
pair, layer and model:

- ``shuffled``: the mean over **all** permutations of b's rows, computed exactly (no seeds): with
  centred X, Y, a uniformly random permutation P gives ``E ||X^T P Y||_F^2 = tr(K) tr(L) / (n - 1)``,
  so the biased CKA floor is ``tr(K) tr(L) / ((n - 1) ||K||_F ||L||_F)`` (far from 0 when n is not
  much larger than d: about 0.44 at n = 1,000, d = 768); the unbiased HSIC's expectation is exactly 0
  (the coefficients of its three terms cancel: ``1/(n(n-1)) + 1/((n-1)(n-2)) - 2/(n(n-2)) = 0``), and
  so is RSA's (each pair of sentences meets a uniformly random pair, whose standardised
  dissimilarity averages 0). What the estimator gives for unrelated sentences.
- ``length_matched``: the mean over ``floor_seeds`` seeded permutations pairing each sentence i of a
  with another sentence j != i of b whose token count (encode's ``<lang>.lengths.npy``) is that of
  i's translation, or the nearest available (:func:`length_matched_permutation`). Translations
  share length, and mean-pooled position embeddings encode length, so a measure can be high for any
  two sentences of equal length; this floor keeps that length agreement and removes the meaning. A
  value above it is similarity beyond sentence length.

The intervals (``spread``, ``spread_difference``) are :mod:`stages.halfsamples`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.measures import CKAStats, cka_stats, hsic_u_numerator, ratio

if TYPE_CHECKING:
    import numpy as np

FLOOR_MEASURES = ("cka", "cka_debiased", "rsa")  # isomorphism ignores the alignment: no floor
SeedLike = int | Sequence[int]


# --------------------------------------------------------------------------------------------------
# Floors: the measure between sentences that are not translations of each other
# --------------------------------------------------------------------------------------------------


def _length_windows(sorted_lengths: np.ndarray) -> list[list[int]]:
    """Consecutive positions of a sorted length array, in windows of at least 2: the runs of equal
    length, a run of one joining the neighbouring window of nearer length (the next one on a tie, so
    that sentences of distinct lengths pair up with a neighbour instead of chaining into one window)."""
    import numpy as np

    bounds = np.flatnonzero(np.r_[True, sorted_lengths[1:] != sorted_lengths[:-1], True])
    runs = [list(range(int(lo), int(hi))) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    windows: list[list[int]] = []
    carry: list[int] = []
    for r, run in enumerate(runs):
        run = carry + run
        carry = []
        if len(run) >= 2:
            windows.append(run)
            continue
        p = run[0]
        prev_gap = sorted_lengths[p] - sorted_lengths[windows[-1][-1]] if windows else math.inf
        next_gap = sorted_lengths[runs[r + 1][0]] - sorted_lengths[p] if r + 1 < len(runs) else math.inf
        if windows and prev_gap < next_gap:
            windows[-1].append(p)
        else:
            carry = run  # joins the next run (there is one: at least 2 sentences, no window yet or it is as near)
    return windows


def length_matched_permutation(lengths: Any, seed: SeedLike) -> np.ndarray:
    """A permutation ``perm`` of the sentences of b with ``perm[i] != i`` and
    ``lengths[perm[i]]`` equal, or as near as available, to ``lengths[i]``.

    ``lengths[i]`` is the token count of sentence i in language b, i.e. of the translation of a's
    sentence i; pairing a's sentence i with b's sentence ``perm[i]`` keeps the length agreement of
    translations and loses their meaning. The sentences are sorted by length (ties in a seeded random
    order) and cut into windows of equal length (a length held by one sentence joins the neighbouring
    window of nearest length); within each window each sentence is paired with the next one, the last
    with the first: a random cycle within every group of equal length, so only the joined sentences
    are paired with a different length.
    """
    import numpy as np

    lengths = np.asarray(lengths)
    n = len(lengths)
    if n < 2:
        raise ValueError(f"a permutation without fixed points needs at least 2 sentences, got {n}")
    order = np.lexsort((np.random.default_rng(seed).random(n), lengths))  # by length, ties at random
    perm = np.empty(n, dtype=np.int64)
    for window in _length_windows(lengths[order]):
        members = order[window]
        perm[members] = np.roll(members, -1)
    return perm


@dataclass(frozen=True)
class Gram:
    """A centred representation's Gram matrix ``K = Xc Xc^T`` (rows and columns in some sentence order)
    and the self terms of its CKA, which no reordering of the sentences changes."""

    k: np.ndarray  # [n, n]
    diag: np.ndarray  # [n] k_i = ||x_i||^2
    self_sq: float  # ||K||_F^2 = ||Xc^T Xc||_F^2
    self_unbiased: float  # n(n-3) HSIC_u(X, X)

    @property
    def n(self) -> int:
        return int(self.diag.shape[0])


def gram(x: Any, order: np.ndarray | None = None) -> Gram:
    """The :class:`Gram` of ``x`` [n, d] with its rows in ``order`` (None: as they are)."""
    import numpy as np

    return gram_from_stats(cka_stats(x), np.arange(np.shape(x)[0]) if order is None else order)


def gram_from_stats(st: CKAStats, order: np.ndarray, out: np.ndarray | None = None) -> Gram:
    """The :class:`Gram` of a representation whose :class:`CKAStats` are computed, rows in ``order``
    (the matrix written into ``out``, a float64 [n, n] array, when given)."""
    import numpy as np

    xo = st.xc[order]
    return Gram(np.matmul(xo, xo.T, out=out), st.sq_norms[order], st.self_sq, st.self_unbiased)


def cka_from_cross(a: Gram, b: Gram, cross_sq: float, b_diag: np.ndarray) -> tuple[float, float]:
    """(linear CKA, debiased linear CKA) from ``||Xc^T Yc||_F^2`` and Y's squared row norms aligned with X's rows."""
    biased = ratio(cross_sq, a.self_sq, b.self_sq)
    return biased, ratio(hsic_u_numerator(cross_sq, a.diag, b_diag, a.n), a.self_unbiased, b.self_unbiased)


def shuffled_cka(a: Gram, b: Gram) -> tuple[float, float]:
    """The mean (linear CKA, debiased linear CKA) of X_a against Y_b over all permutations of Y's rows:
    ``(tr K tr L / ((n - 1) ||K||_F ||L||_F), 0)`` (see the module docstring, Floors)."""
    biased = ratio(float(a.diag.sum()) * float(b.diag.sum()) / (a.n - 1), a.self_sq, b.self_sq)
    return biased, 0.0 if a.self_unbiased > 0 and b.self_unbiased > 0 else math.nan


@dataclass(frozen=True)
class RdmStats:
    """A standardised RDM as a symmetric matrix with zero diagonal (rows in some sentence order), and,
    for half-samples, the sums of its entries and of their squares over the pairs each one keeps."""

    z: np.ndarray  # [n, n]
    total: np.ndarray | None = None  # [B] sum over pairs i < j in the half-sample
    square: np.ndarray | None = None  # [B] sum of squares over those pairs


def permuted_rsa(a: RdmStats | None, b: RdmStats | None, perm: np.ndarray) -> float:
    """RSA of X_a against Y_b with b's rows permuted by ``perm`` (in the RDMs' own row order):
    ``sum_{i<j} z_a[i, j] z_b[perm i, perm j]``."""
    import numpy as np

    if a is None or b is None:
        return math.nan
    zp = b.z.take(perm, axis=0).take(perm, axis=1)
    return 0.5 * float(np.dot(a.z.reshape(-1), zp.reshape(-1)))


FLOORS_METHOD = (
    "the measure between a's sentences and b's rows permuted; shuffled: the exact mean over all permutations "
    "(biased CKA tr(K) tr(L) / ((n-1) ||K|| ||L||), debiased CKA and RSA 0); length_matched: mean over floor_seeds "
    "permutations pairing each sentence with another sentence of b (never its own translation) of the same token "
    "length as its translation, or the nearest length available"
)
