"""Stage ``similarity``: how alike two languages' representations are, layer by layer (docs/methods.md 10).

Inputs: ``encodings`` artifacts (stage ``encode``), one per model variant and one per subnetwork
language. They are grouped by the ``variant`` (and ``language``) of their ``meta.json``, not by the
input they arrive on: ``encodings`` takes any of them; ``subnetworks``, ``base`` and ``random`` are
optional extra slots for specs that produce the variants in separate stages.

Representations compared, for a model and a pair of languages (a, b) at layer l: the pooled hidden
states ``X`` [n, d] of a's sentences and ``Y`` of b's (the same sentences, translated). For the
subnetwork model, a's sentences go through a's subnetwork and b's through b's.

Measures (pure numpy functions in float64 below):

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
  the same subset for every language) form an unweighted, symmetrised k-nearest-neighbour graph
  (``isomorphism_k`` neighbours by cosine similarity of the column-centred vectors); with the
  eigenvalues of each graph's Laplacian L = D - A sorted in decreasing order, k_g is the smallest k
  whose top-k eigenvalues hold ``isomorphism_energy`` (90%) of the sum, k = min(k_a, k_b), and the
  score is ``sum_{i<=k} (lambda_a,i - lambda_b,i)^2``. It is a **distance**: 0 for isomorphic
  graphs, larger for less isomorphic ones; it does not use the sentence alignment.

Whatever can be reused across pairs is computed once per (language, layer): the centred matrix,
``||X^T X||_F`` (BLAS syrk), the row norms and the unbiased self-HSIC; the standardised RDM triangle;
the Laplacian spectrum. Each pair then costs one ``X^T Y`` product (shared by both CKAs), one dot
product (RSA) and a vector difference (isomorphism).

Output ``metrics`` (type ``metrics``): ``similarity.json``::

    {"languages": [...], "reference": "en", "layers": [0, ..., L],
     "models": ["full", "subnetwork", "base", "random"],          # those present, in this order
     "pairwise": {"<model>": {"<measure>": {"<a>-<b>": [one value per layer]}}},
     "layer_by_layer": {"<lang>": [[(L+1) x (L+1) linear CKA: rows = full-model layers,
                                    columns = that language's subnetwork layers]]},
     "isomorphism_method": "...", "n": 1000}

Pairs are every unordered pair ``a-b`` with a before b in ``languages``. A value that cannot be
computed (a constant representation) is ``null``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from orchestrator.stage import Input, Inputs, ResolvedInput, StageContext, StageDef, StageInterrupted, StageParams, stage
from stages._io import META_FILE, effective_seed, write_json

if TYPE_CHECKING:
    import numpy as np

MEASURES = ("cka", "cka_debiased", "rsa", "isomorphism")
MODELS = ("full", "subnetwork", "base", "random")
SIMILARITY_FILE = "similarity.json"
Measure = Literal["cka", "cka_debiased", "rsa", "isomorphism"]


class SimilarityParams(StageParams):
    """Parameters of the ``similarity`` stage."""

    reference: str = Field("en", description="Reference language of the study's curves (must be encoded).")
    languages: list[str] | None = Field(None, description="Languages to compare, in order; None: the encodings'.")
    measures: list[Measure] = Field(default_factory=lambda: list(MEASURES), min_length=1,
                                    description="Measures to compute (cka, cka_debiased, rsa, isomorphism).")
    rsa_method: Literal["pearson", "spearman"] = Field("pearson", description="Correlation of the RDM triangles.")
    isomorphism_k: int = Field(10, ge=1, description="Nearest neighbours per sentence in the isomorphism graphs.")
    isomorphism_energy: float = Field(0.9, gt=0.0, le=1.0, description="Share of the Laplacian spectrum that "
                                      "fixes how many eigenvalues are compared.")
    isomorphism_max_sentences: int | None = Field(
        500, ge=3, description="Seeded subset of sentences for the isomorphism graphs (the eigendecomposition is "
        "cubic: ~0.04 s at 500, ~0.3 s at 1000 per language and layer on 2 cores); None: all."
    )
    layer_by_layer: bool = Field(True, description="Compute the full x subnetwork layer CKA matrices.")
    seed: int | None = Field(None, description="Seed of the isomorphism subset; None: the job's seed.")

    @field_validator("measures")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"measures: duplicates in {v}")
        return v


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


def reusable_buffer(buffers: list[np.ndarray] | None, i: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """``buffers[i]`` if it is a float64 array of ``shape``, else a new one stored there (None
    without ``buffers``). Reusing memory matters here: the first write to a fresh 30 MB array
    (5,000 x 768) costs 2-6x the centring itself in page faults (measured 11-36 ms vs 5.7 ms)."""
    import numpy as np

    if buffers is None:
        return None
    while len(buffers) <= i:
        buffers.append(np.empty(0))
    if buffers[i].shape != shape:
        buffers[i] = np.empty(shape, dtype=np.float64)
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


def _hsic_u_numerator(cross_sq: float, k: np.ndarray, l: np.ndarray, n: int) -> float:  # noqa: E741
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
    return CKAStats(xc, k, self_sq, _hsic_u_numerator(self_sq, k, k, n))


def _ratio(num: float, a: float, b: float) -> float:
    if not (a > 0 and b > 0) or not math.isfinite(num):
        return math.nan
    return num / math.sqrt(a * b)


def cka_pair(a: CKAStats, b: CKAStats, *, debiased: bool = True) -> tuple[float, float]:
    """(linear CKA, debiased linear CKA) of two representations of the same n sentences: one
    d_a x d_b product, shared by both."""
    if a.n != b.n:
        raise ValueError(f"CKA compares the same sentences: {a.n} vs {b.n} rows")
    cross_sq = _frobenius_sq(a.xc.T @ b.xc)
    biased = _ratio(cross_sq, a.self_sq, b.self_sq)
    if not debiased:
        return biased, math.nan
    unbiased = _ratio(_hsic_u_numerator(cross_sq, a.sq_norms, b.sq_norms, a.n), a.self_unbiased, b.self_unbiased)
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


def rdm_triangle(x: Any) -> np.ndarray:
    """Upper triangle (row-major, diagonal excluded) of the RDM ``1 - cos(x_i, x_j)``."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xn = x / np.where(norms > 0, norms, 1.0)
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


def rsa_pair(va: np.ndarray | None, vb: np.ndarray | None) -> float:
    """Correlation of two prepared RDM triangles (:func:`rsa_vector`)."""
    if va is None or vb is None:
        return math.nan
    return float(va @ vb)


def rsa(x: Any, y: Any, method: str = "pearson") -> float:
    """RSA score of two representations: correlation of their RDMs' upper triangles."""
    return rsa_pair(rsa_vector(x, method), rsa_vector(y, method))


# --------------------------------------------------------------------------------------------------
# Isomorphism: eigenvector similarity of k-NN graphs
# --------------------------------------------------------------------------------------------------


def knn_adjacency(x: Any, k: int) -> np.ndarray:
    """Symmetric 0/1 adjacency of the k-NN graph (cosine similarity of the centred rows)."""
    import numpy as np

    xc = center(x)
    n = xc.shape[0]
    if n < 2:
        raise ValueError("a k-NN graph needs at least 2 points")
    k = min(k, n - 1)
    norms = np.linalg.norm(xc, axis=1, keepdims=True)
    xn = xc / np.where(norms > 0, norms, 1.0)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    nbrs = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # the k most similar of each row (deterministic)
    adj = np.zeros((n, n), dtype=np.float64)
    adj[np.repeat(np.arange(n), k), nbrs.reshape(-1)] = 1.0
    return np.maximum(adj, adj.T)


def laplacian_spectrum(x: Any, k: int) -> np.ndarray:
    """Eigenvalues, largest first, of the Laplacian D - A of the k-NN graph of ``x``."""
    import numpy as np

    adj = knn_adjacency(x, k)
    lap = np.diag(adj.sum(axis=1)) - adj
    return np.linalg.eigvalsh(lap)[::-1].copy()


def energy_k(eigs: np.ndarray, energy: float) -> int:
    """Smallest k whose k largest eigenvalues sum to at least ``energy`` of the total."""
    import numpy as np

    total = float(eigs.sum())
    if total <= 0:
        return len(eigs)
    return int(np.searchsorted(np.cumsum(eigs) / total, energy - 1e-12) + 1)


def eigenvector_similarity(ea: np.ndarray, eb: np.ndarray, energy: float = 0.9) -> float:
    """Sogaard et al.'s distance between two Laplacian spectra (largest first); 0 = isomorphic."""
    import numpy as np

    k = min(energy_k(ea, energy), energy_k(eb, energy), len(ea), len(eb))
    return float(np.sum((ea[:k] - eb[:k]) ** 2))


def isomorphism(x: Any, y: Any, k: int = 10, energy: float = 0.9) -> float:
    """Eigenvector similarity of the k-NN graphs of two representations."""
    return eigenvector_similarity(laplacian_spectrum(x, k), laplacian_spectrum(y, k), energy)


def isomorphism_description(k: int, energy: float, m: int) -> str:
    return (
        f"eigenvector similarity (Sogaard et al. 2018): sum of squared differences of the top-k Laplacian "
        f"eigenvalues of unweighted symmetric {k}-NN graphs (cosine similarity of column-centred sentence "
        f"vectors, {m} sentences), k = smallest count holding {energy:g} of each spectrum, min over the pair; "
        f"a distance, 0 = isomorphic"
    )


# --------------------------------------------------------------------------------------------------
# Per (language, layer) cache and the comparison of a set of representations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasureConfig:
    measures: tuple[str, ...] = MEASURES
    rsa_method: str = "pearson"
    iso_k: int = 10
    iso_energy: float = 0.9
    iso_rows: Any = None  # indices of the isomorphism subset (None: all rows)


@dataclass(frozen=True)
class RepStats:
    """What one representation (a language at a layer) contributes to the pairwise RSA and isomorphism."""

    rsa: np.ndarray | None
    spectrum: np.ndarray | None


def rep_stats(x: Any, cfg: MeasureConfig) -> RepStats:
    """Compute once what every pair involving ``x`` reuses (CKA is computed for all pairs at once)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    want = set(cfg.measures)
    rsa_v = rsa_vector(x, cfg.rsa_method) if "rsa" in want else None
    spectrum = None
    if "isomorphism" in want:
        rows = x if cfg.iso_rows is None else x[cfg.iso_rows]
        spectrum = laplacian_spectrum(rows, cfg.iso_k)
    return RepStats(rsa_v, spectrum)


def pair_measures(a: RepStats, b: RepStats, cfg: MeasureConfig) -> dict[str, float]:
    """RSA and isomorphism of one pair from the two cached representations."""
    out: dict[str, float] = {}
    if "rsa" in cfg.measures:
        out["rsa"] = rsa_pair(a.rsa, b.rsa)
    if "isomorphism" in cfg.measures and a.spectrum is not None and b.spectrum is not None:
        out["isomorphism"] = eigenvector_similarity(a.spectrum, b.spectrum, cfg.iso_energy)
    return out


def layer_measures(
    xs: Sequence[Any], cfg: MeasureConfig, buffers: list[np.ndarray] | None = None
) -> list[dict[str, float]]:
    """Every requested measure of every pair ``(i, j)``, i < j, of one layer's representations
    (``buffers``: see :func:`cka_matrix`)."""
    want = set(cfg.measures)
    cka = cka_matrix(xs, debiased="cka_debiased" in want, buffers=buffers) if want & {"cka", "cka_debiased"} else None
    stats = [rep_stats(x, cfg) for x in xs] if want & {"rsa", "isomorphism"} else None
    out: list[dict[str, float]] = []
    for i, j in itertools.combinations(range(len(xs)), 2):
        values = pair_measures(stats[i], stats[j], cfg) if stats is not None else {}
        if cka is not None:
            values.update({m: float(cka[k][i, j]) for k, m in enumerate(("cka", "cka_debiased")) if m in want})
        out.append({m: values[m] for m in cfg.measures if m in values})
    return out


def language_pairs(languages: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair (a, b), a before b in ``languages``."""
    return list(itertools.combinations(languages, 2))


LayerGetter = Callable[[str, int], Any]  # (language, layer) -> [n, d] array


def pairwise_by_layer(
    get: LayerGetter,
    languages: Sequence[str],
    n_layers: int,
    cfg: MeasureConfig,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """``{measure: {"a-b": [value per layer]}}`` for every pair of ``languages``.

    Layer-major: at each layer every language's statistics are computed once and then every pair is
    compared, so memory holds one layer's representations and caches at a time.
    """
    pairs = language_pairs(languages)
    result: dict[str, dict[str, list[float]]] = {m: {f"{a}-{b}": [] for a, b in pairs} for m in cfg.measures}
    buffers: list[np.ndarray] = []  # the centred matrices of one layer, reused by the next
    for layer in range(n_layers):
        if should_stop is not None and should_stop():
            raise StageInterrupted("similarity: stop requested (nothing to checkpoint, the stage reruns)")
        values = layer_measures([get(lang, layer) for lang in languages], cfg, buffers)
        for (a, b), measures in zip(pairs, values, strict=True):
            for m, v in measures.items():
                result[m][f"{a}-{b}"].append(v)
    return result


def layer_cka_matrix(
    xs: Sequence[Any], ys: Sequence[Any], buffers: list[np.ndarray] | None = None
) -> list[list[float]]:
    """Linear CKA of every layer of ``xs`` (rows) against every layer of ``ys`` (columns)
    (``buffers``: see :func:`cka_matrix`)."""
    import numpy as np

    stats = [cka_stats(x, reusable_buffer(buffers, i, np.shape(x))) for i, x in enumerate([*xs, *ys])]
    sx, sy = stats[: len(xs)], stats[len(xs) :]
    return [[cka_pair(a, b, debiased=False)[0] for b in sy] for a in sx]


# --------------------------------------------------------------------------------------------------
# Encodings artifacts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encodings:
    """An ``encodings`` artifact: its directory and meta.json."""

    path: Path
    meta: Mapping[str, Any]

    @property
    def variant(self) -> str:
        return str(self.meta.get("variant"))

    @property
    def languages(self) -> list[str]:
        return list(self.meta.get("languages") or [])

    def layer(self, lang: str, layer: int) -> np.ndarray:
        import numpy as np

        arr = np.load(self.path / f"{lang}.npy", mmap_mode="r")
        if arr.ndim != 3:
            raise ValueError(f"{self.path}/{lang}.npy: expected [layers, n, hidden], got shape {arr.shape}")
        return np.asarray(arr[layer])  # as stored (float32/float16): each measure casts to float64 as it reads

    def shape(self, lang: str) -> tuple[int, ...]:
        import numpy as np

        return tuple(np.load(self.path / f"{lang}.npy", mmap_mode="r").shape)


def load_encodings(ri: ResolvedInput) -> Encodings:
    meta_path = Path(ri.path) / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else dict(ri.metadata)
    if meta.get("variant") not in MODELS:
        raise ValueError(f"encodings {ri.ref}: unknown variant {meta.get('variant')!r}; expected one of {MODELS}")
    if meta["variant"] == "subnetwork" and not meta.get("language"):
        raise ValueError(f"encodings {ri.ref}: a subnetwork encoding must name its mask language")
    return Encodings(Path(ri.path), meta)


def group_encodings(items: Sequence[Encodings]) -> tuple[dict[str, Encodings], dict[str, Encodings]]:
    """(variant -> artifact for full/base/random, language -> subnetwork artifact); duplicates are errors."""
    models: dict[str, Encodings] = {}
    subnets: dict[str, Encodings] = {}
    for e in items:
        if e.variant == "subnetwork":
            lang = str(e.meta["language"])
            if lang in subnets:
                raise ValueError(f"two subnetwork encodings for language {lang!r}")
            subnets[lang] = e
        else:
            if e.variant in models:
                raise ValueError(f"two encodings of variant {e.variant!r}; give one per variant")
            models[e.variant] = e
    return models, subnets


def _check_consistent(items: Sequence[Encodings], languages: Sequence[str]) -> tuple[int, int]:
    """(n sentences, layers + 1) shared by every artifact; raise on any mismatch."""
    ids = {e.meta.get("ids_sha256") for e in items} - {None}
    if len(ids) > 1:
        raise ValueError("the encodings were made from different parallel corpora (ids_sha256 differ)")
    shapes: set[tuple[int, int]] = set()
    for e in items:
        missing = [lang for lang in languages if lang not in e.languages]
        if missing:
            raise ValueError(f"encodings {e.path.name} ({e.variant}) lack language(s) {missing}")
        for lang in languages:
            s = e.shape(lang)
            shapes.add((int(s[0]), int(s[1])))
    if len(shapes) != 1:
        raise ValueError(f"the encodings differ in (layers + 1, n): {sorted(shapes)}")
    n_layers, n = shapes.pop()
    return n, n_layers


def _finite_or_none(obj: Any) -> Any:
    """Replace NaN/inf by None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------


def _gather(inputs: Inputs) -> list[Encodings]:
    items: list[Encodings] = []
    for name in ("encodings", "subnetworks", "base", "random"):
        value = inputs.get(name)
        if value is None:
            continue
        for ri in value if isinstance(value, list) else [value]:
            items.append(load_encodings(ri))
    if not items:
        raise ValueError("similarity: no encodings input")
    return items


def _representations(
    model: str, languages: list[str], models: Mapping[str, Encodings], subnets: Mapping[str, Encodings]
) -> tuple[list[str], LayerGetter]:
    """The languages a model covers and how to read a language's layer (subnetwork: its own mask's)."""
    if model == "subnetwork":
        return [lang for lang in languages if lang in subnets], lambda lang, layer: subnets[lang].layer(lang, layer)
    enc = models[model]
    return list(languages), lambda lang, layer: enc.layer(lang, layer)


def _reference_means(pairwise: Mapping[str, Any], reference: str) -> dict[str, float]:
    """Mean over layers of every curve involving the reference language (for the tracking run)."""
    out: dict[str, float] = {}
    for model, measures in pairwise.items():
        for measure, curves in measures.items():
            for pair, values in curves.items():
                finite = [v for v in values if math.isfinite(v)]
                if finite and reference in (pair.split("-", 1)[0], pair.rsplit("-", 1)[-1]):
                    out[f"{model}/{measure}/{pair}/mean"] = sum(finite) / len(finite)
    return out


def _languages(params: SimilarityParams, items: Sequence[Encodings]) -> list[str]:
    if params.languages is not None:
        langs = list(params.languages)
    else:
        first = next((e for e in items if e.variant == "full"), items[0])
        langs = [lang for lang in first.languages if all(lang in e.languages for e in items)]
    if params.reference not in langs:
        raise ValueError(f"reference {params.reference!r} is not among the compared languages {langs}")
    return langs


@stage(
    "similarity",
    params=SimilarityParams,
    inputs={
        "encodings": Input(type="encodings", many=True),
        "subnetworks": Input(type="encodings", many=True, optional=True),
        "base": Input(type="encodings", many=True, optional=True),
        "random": Input(type="encodings", many=True, optional=True),
    },
    outputs={"metrics": "metrics"},
    version="1",
)
def similarity_stage(params: SimilarityParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """CKA, debiased CKA, RSA and isomorphism between languages, per layer, for every model."""
    import time

    import numpy as np

    items = _gather(inputs)
    models, subnets = group_encodings(items)
    languages = _languages(params, items)
    n, n_layers = _check_consistent(items, languages)
    seed = effective_seed(ctx.seed, params.seed)
    iso_rows = None
    m_iso = n
    if params.isomorphism_max_sentences is not None and n > params.isomorphism_max_sentences:
        m_iso = params.isomorphism_max_sentences
        iso_rows = np.sort(np.random.default_rng(seed).choice(n, size=m_iso, replace=False))
    cfg = MeasureConfig(tuple(params.measures), params.rsa_method, params.isomorphism_k,
                        params.isomorphism_energy, iso_rows)
    present = [m for m in MODELS if (m == "subnetwork" and subnets) or m in models]
    pairwise: dict[str, Any] = {}
    start = time.perf_counter()
    for model in present:
        langs, get = _representations(model, languages, models, subnets)
        pairwise[model] = pairwise_by_layer(get, langs, n_layers, cfg, should_stop=ctx.stop_requested.is_set)
        ctx.log({f"seconds/{model}": time.perf_counter() - start})
    layer_by_layer: dict[str, list[list[float]]] = {}
    if params.layer_by_layer and "full" in models:
        full = models["full"]
        buffers: list[np.ndarray] = []  # one language's centred layers, reused by the next
        for lang in (lang for lang in languages if lang in subnets):
            xs = [full.layer(lang, i) for i in range(n_layers)]
            ys = [subnets[lang].layer(lang, j) for j in range(n_layers)]
            layer_by_layer[lang] = layer_cka_matrix(xs, ys, buffers)
    result = {
        "languages": languages,
        "reference": params.reference,
        "layers": list(range(n_layers)),
        "models": present,
        "pairwise": pairwise,
        "layer_by_layer": layer_by_layer,
        "isomorphism_method": isomorphism_description(params.isomorphism_k, params.isomorphism_energy, m_iso),
        "n": n,
    }
    out = ctx.output_dir("metrics")
    write_json(out / SIMILARITY_FILE, _finite_or_none(result))
    ctx.log(_reference_means(pairwise, params.reference))
    meta = {
        "languages": languages,
        "reference": params.reference,
        "models": present,
        "subnetwork_languages": [lang for lang in languages if lang in subnets],
        "measures": list(params.measures),
        "rsa_method": params.rsa_method,
        "n": n,
        "layers": n_layers,
        "seconds": time.perf_counter() - start,
    }
    return {"metrics": meta}


SIMILARITY: StageDef = similarity_stage
