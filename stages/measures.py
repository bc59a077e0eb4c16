"""The similarity measures: pure numpy functions of [n, d] representations, in float64.

A measure of two representations is split in two: what one representation contributes, computed once
per (language, layer) and reused by every pair it enters (:class:`CKAStats`: the centred matrix, its
``||X^T X||_F`` and row norms; the standardised RDM of :func:`rdm_square`; the Laplacian spectrum of
:func:`laplacian_spectrum`), and the combination of two of them (:func:`cka_pair`: one ``X^T Y``
product for both CKAs; :func:`rsa_pair`: one dot product; :func:`eigenvector_similarity`: a vector
difference). Comparing L languages then costs L statistics and L(L-1)/2 cheap combinations; the
one-call forms (:func:`linear_cka`, :func:`debiased_cka`, :func:`rsa`, :func:`isomorphism`) compose
the two, for tests and one-off use.

Nothing here draws random numbers, reads artifacts or knows which pairs are compared: floors and
intervals are :mod:`stages.resampling`'s and :mod:`stages.halfsamples`'s, the loop over layers and pairs :mod:`stages.pairwise`'s.
numpy is imported inside the functions, so importing this module (the engine does, to build the
stage registry) stays cheap.

The measures:

- ``cka``: linear CKA (Kornblith et al. 2019), in feature space on column-centred X, Y:
  ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``.
- ``cka_debiased``: CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021), also
  in feature space. With K = X X^T, L = Y Y^T (X, Y centred), their diagonals k_i = ||x_i||^2,
  l_i = ||y_i||^2 zeroed (K~, L~), the estimator's three terms need no n x n matrix:
  ``tr(K~L~) = ||X^T Y||_F^2 - k.l``, ``1^T K~ 1 = -sum(k)`` (column sums are 0) and
  ``1^T K~ L~ 1 = k.l``, so
  ``HSIC_u = (||X^T Y||_F^2 - k.l + sum(k) sum(l) / ((n-1)(n-2)) - 2 k.l / (n-2)) / (n (n-3))``.
  (The estimator is invariant to shifting X or Y by a constant row, so centring first changes nothing.)
  Near 0 for unrelated representations, where biased CKA of random high-dimensional features is
  large (about 0.44 for n=1000, d=768).
- ``rsa``: representational similarity analysis: RDM = 1 - cosine similarity of every pair of
  sentences, score = Pearson (``rsa_method="spearman"``: Spearman) correlation of the two RDMs' upper
  triangles.
- ``isomorphism``: **eigenvector similarity** (Sogaard, Ruder and Vulic 2018, "On the limitations of
  unsupervised bilingual dictionary induction"), chosen over relational similarity because the
  latter (correlation of the pairwise cosine similarities of aligned items) is what ``rsa`` already
  measures. Each language's sentences (a seeded subset of at most ``isomorphism_max_sentences``,
  the same subset for every language) form an unweighted, symmetrised k-nearest-neighbour graph;
  with the eigenvalues of each graph's Laplacian L = D - A in a fixed order, k_g is the smallest
  count of leading eigenvalues that hold ``isomorphism_energy`` (90%) of the spectrum's sum,
  k = min(k_a, k_b), and the score is ``sum_{i<=k} (lambda_a,i - lambda_b,i)^2``. It is a
  **distance**: 0 for isomorphic graphs, larger for less isomorphic ones; it does not use the
  sentence alignment. Two variants (``isomorphism_variant``):

  * ``paper`` (default), as the paper describes the measure: ``isomorphism_k`` (default 10)
    neighbours by cosine similarity of the column-centred vectors; eigenvalues largest first.
  * ``authors_code``, as the authors' released evaluation script (published with Vulic, Ruder and
    Sogaard 2020) computes it: every vector L2-normalised, the columns centred, the vectors
    normalised again; ``isomorphism_k`` (default 1) nearest neighbour by Euclidean distance of those
    unit vectors (the same ranking as cosine); eigenvalues **smallest** first (the energy count and
    the compared eigenvalues both start at the smallest, the eigenvalue 0 included).

  Both depart from the authors' setting in what the nodes are: the embeddings of a language's most
  frequent words there (10,000 in the script), sentence vectors of a parallel corpus here
  (``isomorphism_max_sentences``, 500). The neighbourhood size of ``paper`` (10) is this project's
  choice; the script uses 1, which splits a few hundred nodes into many small components.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

ISO_VARIANTS = ("paper", "authors_code")


# --------------------------------------------------------------------------------------------------
# Linear CKA, biased and debiased, in feature space
# --------------------------------------------------------------------------------------------------


def center(x: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Column-centred float64 copy of a [n, d] matrix, cast and centred in one pass (into ``out``,
    a float64 array of the same shape, when given)."""
    import numpy as np

    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a [n, d] matrix, got shape {x.shape}")
    if out is None:
        out = np.empty(x.shape, dtype=np.float64)
    np.subtract(x, x.mean(axis=0, dtype=np.float64), out=out)  # no float64 copy of x in between
    return out


def reusable_buffer(
    buffers: list[np.ndarray] | None, i: int, shape: tuple[int, ...], dtype: Any = None
) -> np.ndarray | None:
    """``buffers[i]`` if it is an array of ``shape`` and ``dtype`` (default float64), else a new one
    stored there (None without ``buffers``). Reusing memory matters here: the first write to a fresh 30 MB array
    (5,000 x 768) costs 2-6x the centring itself in page faults (measured 11-36 ms vs 5.7 ms)."""
    import numpy as np

    if buffers is None:
        return None
    dtype = np.dtype(np.float64 if dtype is None else dtype)
    while len(buffers) <= i:
        buffers.append(np.empty(0))
    if buffers[i].shape != shape or buffers[i].dtype != dtype:
        buffers[i] = np.empty(shape, dtype=dtype)
    return buffers[i]


@dataclass(frozen=True)
class CKAStats:
    """What one representation contributes to every CKA it enters (computed once, reused per pair)."""

    xc: np.ndarray  # column-centred float64 [n, d]
    sq_norms: np.ndarray  # k_i = ||x_i||^2 of the centred rows
    self_sq: float  # ||Xc^T Xc||_F^2
    self_unbiased: float  # n(n-3) HSIC_u(X, X) (the factor cancels in CKA)

    @property
    def n(self) -> int:
        return int(self.xc.shape[0])


def _frobenius_sq(m: np.ndarray) -> float:
    import numpy as np

    flat = m.reshape(-1)
    return float(np.dot(flat, flat))  # BLAS ddot: no squared copy of m


def hsic_u_numerator(cross_sq: float, k: np.ndarray, l: np.ndarray, n: int) -> float:  # noqa: E741
    """n(n-3) HSIC_u from ||X^T Y||_F^2 and the squared row norms of centred X, Y."""
    kl = float(k @ l)
    return cross_sq - kl + float(k.sum()) * float(l.sum()) / ((n - 1) * (n - 2)) - 2.0 * kl / (n - 2)


def cka_stats(x: Any, out: np.ndarray | None = None) -> CKAStats:
    """Centre ``x`` (into ``out`` when given) and precompute its norms (d x d products only)."""
    import numpy as np

    xc = center(x, out)
    n = xc.shape[0]
    if n < 4:
        raise ValueError(f"CKA needs at least 4 sentences (the debiased estimator divides by n-3), got {n}")
    self_sq = _frobenius_sq(xc.T @ xc)  # numpy sees X^T X and calls BLAS syrk: half a general product
    k = np.einsum("ij,ij->i", xc, xc)
    return CKAStats(xc, k, self_sq, hsic_u_numerator(self_sq, k, k, n))


def ratio(num: float, a: float, b: float) -> float:
    """``num / sqrt(a b)``: the normalisation of every CKA; NaN unless a, b > 0 and ``num`` is finite."""
    if not (a > 0 and b > 0) or not math.isfinite(num):
        return math.nan
    return num / math.sqrt(a * b)


def cka_pair(a: CKAStats, b: CKAStats, *, debiased: bool = True) -> tuple[float, float]:
    """(linear CKA, debiased linear CKA) of two representations of the same n sentences: one
    d_a x d_b product, shared by both."""
    if a.n != b.n:
        raise ValueError(f"CKA compares the same sentences: {a.n} vs {b.n} rows")
    cross_sq = _frobenius_sq(a.xc.T @ b.xc)
    biased = ratio(cross_sq, a.self_sq, b.self_sq)
    if not debiased:
        return biased, math.nan
    unbiased = ratio(hsic_u_numerator(cross_sq, a.sq_norms, b.sq_norms, a.n), a.self_unbiased, b.self_unbiased)
    return biased, unbiased


def cka_matrix(
    xs: Sequence[Any], *, debiased: bool = True, buffers: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(linear CKA, debiased linear CKA) of every pair of ``xs``, each [n, d_i] over the same n rows.

    Each representation is centred and its self terms computed once; each pair then costs one
    cross product. Diagonals are 1 (NaN for a constant representation); ``debiased=False`` leaves
    the second matrix NaN. ``buffers``: a list the caller keeps across calls, whose float64 arrays
    are reused for the centred matrices (see :func:`reusable_buffer`).
    """
    import numpy as np

    stats = [cka_stats(x, reusable_buffer(buffers, i, np.shape(x))) for i, x in enumerate(xs)]
    m = len(stats)
    biased, unbiased = np.full((m, m), np.nan), np.full((m, m), np.nan)
    for i, st in enumerate(stats):  # CKA(X, X) = 1 without another product, unless X is constant
        biased[i, i] = 1.0 if st.self_sq > 0 else math.nan
        unbiased[i, i] = 1.0 if debiased and st.self_unbiased > 0 else math.nan
    for i, j in itertools.combinations(range(m), 2):
        biased[i, j], unbiased[i, j] = cka_pair(stats[i], stats[j], debiased=debiased)
        biased[j, i], unbiased[j, i] = biased[i, j], unbiased[i, j]
    return biased, unbiased


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of two [n, d] representations (feature space)."""
    return float(cka_matrix([x, y], debiased=False)[0][0, 1])


def debiased_cka(x: Any, y: Any) -> float:
    """Debiased linear CKA (unbiased HSIC) of two [n, d] representations (feature space)."""
    return float(cka_matrix([x, y])[1][0, 1])


# --------------------------------------------------------------------------------------------------
# RSA
# --------------------------------------------------------------------------------------------------


def rankdata(a: Any) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties given their average rank (as scipy's ``rankdata``)."""
    import numpy as np

    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    bounds = np.flatnonzero(np.r_[True, s[1:] != s[:-1], True])
    avg = (bounds[:-1] + bounds[1:] - 1) / 2.0 + 1.0
    ranks = np.empty(a.shape[0], dtype=np.float64)
    ranks[order] = np.repeat(avg, np.diff(bounds))
    return ranks


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    import numpy as np

    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def rdm_triangle(x: Any) -> np.ndarray:
    """Upper triangle (row-major, diagonal excluded) of the RDM ``1 - cos(x_i, x_j)``."""
    import numpy as np

    xn = _unit_rows(np.asarray(x, dtype=np.float64))
    rdm = 1.0 - xn @ xn.T
    return rdm[_upper_triangle(x.shape[0])]


@functools.lru_cache(maxsize=4)
def _upper_triangle(n: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    return np.triu_indices(n, 1)


def rsa_vector(x: Any, method: str = "pearson") -> np.ndarray | None:
    """The RDM triangle centred and scaled to unit length (ranked first for Spearman); None if constant."""
    import numpy as np

    t = rdm_triangle(x)
    if method == "spearman":
        t = rankdata(t)
    elif method != "pearson":
        raise ValueError(f"unknown RSA correlation {method!r}")
    t = t - t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 0 and math.isfinite(norm) else None


def rdm_square(x: Any, method: str = "pearson", out: np.ndarray | None = None) -> np.ndarray | None:
    """The RDM of :func:`rsa_vector` as a symmetric [n, n] matrix with zero diagonal (rows in ``x``'s
    order): its upper triangle is :func:`rsa_vector`'s, so ``0.5 * <Z_a, Z_b>`` is the RSA score.
    Built from ``x`` directly (no triangle scattered back) except for Spearman, which ranks the triangle;
    into ``out`` (a float64 [n, n] array) when given."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    xn = _unit_rows(x)
    z = np.matmul(xn, xn.T, out=out)
    np.subtract(1.0, z, out=z)
    np.fill_diagonal(z, 0.0)
    if method == "spearman":
        z[_upper_triangle(n)] = rankdata(z[_upper_triangle(n)])
        z[np.tril_indices(n, -1)] = z.T[np.tril_indices(n, -1)]
    elif method != "pearson":
        raise ValueError(f"unknown RSA correlation {method!r}")
    z -= z.sum() / (n * (n - 1))  # the off-diagonal mean
    np.fill_diagonal(z, 0.0)
    norm = math.sqrt(0.5 * _frobenius_sq(z))  # every pair appears twice
    if not (norm > 0 and math.isfinite(norm)):
        return None
    z /= norm
    return z


def rsa_pair(va: np.ndarray | None, vb: np.ndarray | None) -> float:
    """Correlation of two prepared RDMs: triangles (:func:`rsa_vector`) or squares (:func:`rdm_square`)."""
    import numpy as np

    if va is None or vb is None:
        return math.nan
    return float(np.vdot(va, vb)) * (0.5 if va.ndim == 2 else 1.0)


def rsa(x: Any, y: Any, method: str = "pearson") -> float:
    """RSA score of two representations: correlation of their RDMs' upper triangles."""
    return rsa_pair(rsa_vector(x, method), rsa_vector(y, method))


# --------------------------------------------------------------------------------------------------
# Isomorphism: eigenvector similarity of k-NN graphs
# --------------------------------------------------------------------------------------------------


def neighbour_vectors(x: Any, variant: str = "paper") -> np.ndarray:
    """The unit vectors whose dot products rank each point's neighbours.

    ``paper``: the column-centred rows, normalised (cosine similarity of centred vectors).
    ``authors_code``: normalised, column-centred, normalised again (the authors' preprocessing).
    """
    import numpy as np

    if variant == "paper":
        return _unit_rows(center(x))
    if variant == "authors_code":
        return _unit_rows(center(_unit_rows(np.asarray(x, dtype=np.float64))))
    raise ValueError(f"unknown isomorphism variant {variant!r}; use one of {ISO_VARIANTS}")


def knn_adjacency(x: Any, k: int, variant: str = "paper") -> np.ndarray:
    """Symmetric 0/1 adjacency of the k-NN graph (see :func:`neighbour_vectors` for the similarity)."""
    import numpy as np

    xn = neighbour_vectors(x, variant)
    n = xn.shape[0]
    if n < 2:
        raise ValueError("a k-NN graph needs at least 2 points")
    k = min(k, n - 1)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    nbrs = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # the k most similar of each row (deterministic)
    adj = np.zeros((n, n), dtype=np.float64)
    adj[np.repeat(np.arange(n), k), nbrs.reshape(-1)] = 1.0
    return np.maximum(adj, adj.T)


def laplacian_spectrum(x: Any, k: int, variant: str = "paper") -> np.ndarray:
    """Eigenvalues of the Laplacian D - A of the k-NN graph of ``x``: largest first (``paper``) or
    smallest first (``authors_code``, as its script takes them)."""
    import numpy as np

    adj = knn_adjacency(x, k, variant)
    lap = np.diag(adj.sum(axis=1)) - adj
    eigs = np.linalg.eigvalsh(lap)  # ascending
    return eigs if variant == "authors_code" else eigs[::-1].copy()


def energy_k(eigs: np.ndarray, energy: float) -> int:
    """Smallest k whose first k eigenvalues (in the spectrum's order) sum to at least ``energy`` of the total."""
    import numpy as np

    total = float(eigs.sum())
    if total <= 0:
        return len(eigs)
    return int(np.searchsorted(np.cumsum(eigs) / total, energy - 1e-12) + 1)


def eigenvector_similarity(ea: np.ndarray, eb: np.ndarray, energy: float = 0.9) -> float:
    """Sogaard et al.'s distance between two Laplacian spectra (in the same order); 0 = isomorphic."""
    import numpy as np

    k = min(energy_k(ea, energy), energy_k(eb, energy), len(ea), len(eb))
    return float(np.sum((ea[:k] - eb[:k]) ** 2))


def isomorphism(x: Any, y: Any, k: int = 10, energy: float = 0.9, variant: str = "paper") -> float:
    """Eigenvector similarity of the k-NN graphs of two representations."""
    return eigenvector_similarity(laplacian_spectrum(x, k, variant), laplacian_spectrum(y, k, variant), energy)


def isomorphism_description(
    k: int, energy: float, m: int, variant: str = "paper", *, n: int | None = None, resamples: int = 0
) -> str:
    if variant == "authors_code":
        graph = (f"unweighted symmetric {k}-NN graphs (Euclidean distance of vectors L2-normalised, column-centred "
                 f"and normalised again, as the authors' script)")
        order = "smallest"
    else:
        graph = f"unweighted symmetric {k}-NN graphs (cosine similarity of column-centred sentence vectors)"
        order = "largest"
    text = (
        f"eigenvector similarity (Sogaard et al. 2018), variant {variant}: sum of squared differences of the "
        f"{order} k Laplacian eigenvalues of {graph}, {m} sentences, k = smallest count of the {order} "
        f"eigenvalues holding {energy:g} of each spectrum, min over the pair; a distance, 0 = isomorphic"
    )
    if n is not None and resamples > 0:
        text += (f"; spread: +- z sd over {resamples} other random {m}-sentence subsets, sd / sqrt(1 - m/n)"
                 if m < n else "; spread: none (the subset is every sentence: lower isomorphism_max_sentences)")
    return text


# --------------------------------------------------------------------------------------------------
# Layer by layer: every layer of one model against every layer of another
# --------------------------------------------------------------------------------------------------


def layer_cka_matrices(
    xs: Sequence[Any], ys: Sequence[Any], buffers: list[np.ndarray] | None = None
) -> tuple[list[list[float]], list[list[float]]]:
    """(linear CKA, debiased linear CKA) of every layer of ``xs`` (rows) against every layer of ``ys``
    (columns): both from the same cross product (``buffers``: see :func:`cka_matrix`)."""
    import numpy as np

    stats = [cka_stats(x, reusable_buffer(buffers, i, np.shape(x))) for i, x in enumerate([*xs, *ys])]
    sx, sy = stats[: len(xs)], stats[len(xs) :]
    both = [[cka_pair(a, b) for b in sy] for a in sx]
    return [[c[0] for c in row] for row in both], [[c[1] for c in row] for row in both]
