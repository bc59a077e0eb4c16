"""Every measure, floor and spread of every pair of languages, layer by layer: the similarity stage's loop.

:func:`pairwise_by_layer` runs layer-major: at each layer every language's statistics are computed
once and then every pair is compared (:func:`evaluate_layer`), so memory holds one layer's
representations and caches at a time, and the floors' permutations and the half-samples, drawn once
(:class:`MeasureConfig`), serve every layer and every model. The measures are
:mod:`stages.measures`'s, the floors :mod:`stages.resampling`'s and the intervals :mod:`stages.halfsamples`'s
(one layer's floors are computed by :mod:`stages.pairwise_floors`); this module decides
what is computed once and what per pair, and keeps each model's half-sample values so that
:func:`spread_difference` can pair them with the full model's.

Whatever can be reused across pairs is computed once per (language, layer): the centred matrix,
``||X^T X||_F`` (BLAS syrk), the row norms and the unbiased self-HSIC; the standardised RDM (as a
square matrix); the Laplacian spectra; for floors and spread the Gram matrix ``K = X X^T`` and its
group sums. Each pair then costs one ``X^T Y`` product (shared by both CKAs), one dot product (RSA)
and a vector difference (isomorphism). A length-matched permutation of b is applied once to b's
Gram matrix and RDM (an n x n gather, in float32: about 3x faster, with a relative error near 1e-6
on each cross term, ample for a control) and costs each pair two n x n dot products, less than a
``d_a x d_b`` product whenever n < d^2. The spread costs each pair one group-summed elementwise
product of two n x n matrices per measure. Demo size (7 languages x 500 sentences x 5 layers x 4
models, d = 128, one thread): floors add about 0.6 s, spreads about 1 s.

Buffers (:class:`Workspace`) are kept from one layer to the next: writing into a fresh n x n array
costs more in page faults than the arithmetic done in it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.stage import StageInterrupted
from stages.formats.names import FLOOR_KINDS, MEASURES
from stages.halfsamples import (
    GramStats,
    HalfSamples,
    gram_stats,
    half_sample_interval,
    isomorphism_interval,
    rdm_stats,
    subset_cka,
    subset_rsa,
)
from stages.measures import (
    cka_pair,
    cka_stats,
    eigenvector_similarity,
    laplacian_spectrum,
    rdm_square,
    reusable_buffer,
    rsa_pair,
)
from stages.pairwise_floors import FloorPerms, layer_floors
from stages.resampling import FLOOR_MEASURES, Gram, RdmStats, gram_from_stats, length_matched_permutation

if TYPE_CHECKING:
    import numpy as np


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
    iso_variant: str = "paper"
    iso_subsets: tuple[Any, ...] = ()  # the other subsets of the isomorphism spread (row indices)
    floor_seeds: int = 0  # permutations per floor kind (0: no floors)
    seed: int = 0  # of the floors' permutations
    half: HalfSamples | None = None  # the half-samples of the spreads (None: no spread)
    confidence: float = 0.95

    @property
    def row_order(self) -> np.ndarray | None:
        """The sentence order of the RDMs and Gram matrices: the half-samples' (None: the corpus order)."""
        return None if self.half is None else self.half.order

    @property
    def floor_measures(self) -> list[str]:
        return [m for m in FLOOR_MEASURES if m in self.measures] if self.floor_seeds > 0 else []

    @property
    def spread_measures(self) -> list[str]:
        return list(self.measures) if self.half is not None else []

    def iso_size(self, n: int) -> int:
        """Sentences in each isomorphism subset (of n)."""
        return n if self.iso_rows is None else len(self.iso_rows)


@dataclass(frozen=True)
class RepStats:
    """What one representation (a language at a layer) contributes to the pairwise RSA and isomorphism."""

    rsa: np.ndarray | None  # the square standardised RDM (:func:`rdm_square`), rows in ``cfg.row_order``
    spectrum: np.ndarray | None
    subset_spectra: tuple[np.ndarray, ...] = ()  # of the isomorphism spread's other subsets


def rep_stats(x: Any, cfg: MeasureConfig, rdm_out: np.ndarray | None = None) -> RepStats:
    """Compute once what every pair involving ``x`` reuses (CKA is computed for all pairs at once);
    ``rdm_out``: a float64 [n, n] array to hold the RDM."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    want = set(cfg.measures)
    rsa_v = None
    if "rsa" in want:
        rsa_v = rdm_square(x if cfg.row_order is None else x[cfg.row_order], cfg.rsa_method, rdm_out)
    spectrum = None
    subset_spectra: tuple[np.ndarray, ...] = ()
    if "isomorphism" in want:
        rows = x if cfg.iso_rows is None else x[cfg.iso_rows]
        spectrum = laplacian_spectrum(rows, cfg.iso_k, cfg.iso_variant)
        if cfg.half is not None:
            subset_spectra = tuple(laplacian_spectrum(x[r], cfg.iso_k, cfg.iso_variant) for r in cfg.iso_subsets)
    return RepStats(rsa_v, spectrum, subset_spectra)


def pair_measures(a: RepStats, b: RepStats, cfg: MeasureConfig) -> dict[str, float]:
    """RSA and isomorphism of one pair from the two cached representations."""
    out: dict[str, float] = {}
    if "rsa" in cfg.measures:
        out["rsa"] = rsa_pair(a.rsa, b.rsa)
    if "isomorphism" in cfg.measures and a.spectrum is not None and b.spectrum is not None:
        out["isomorphism"] = eigenvector_similarity(a.spectrum, b.spectrum, cfg.iso_energy)
    return out


Interval = tuple[float, float] | None


@dataclass
class Workspace:
    """Float64 arrays reused from one layer to the next (and from one pair to the next): writing into a
    fresh n x n array costs more in page faults than the arithmetic done in it (see :func:`reusable_buffer`)."""

    centred: list[np.ndarray] = field(default_factory=list)  # cka_stats' centred matrices
    grams: list[np.ndarray] = field(default_factory=list)  # one Gram matrix per representation
    rdms: list[np.ndarray] = field(default_factory=list)  # one square RDM per representation
    scratch: list[np.ndarray] = field(default_factory=list)  # temporaries
    single: list[np.ndarray] = field(default_factory=list)  # float32 copies for the floors

    def get(self, kind: str, i: int, shape: tuple[int, ...], dtype: Any = None) -> np.ndarray:
        """Buffer ``i`` of ``kind`` (centred, grams, rdms, scratch or single), of ``shape`` and ``dtype``."""
        buf = reusable_buffer(getattr(self, kind), i, shape, dtype)
        if buf is None:  # unreachable: the list exists
            raise ValueError(f"workspace: no buffer list {kind!r}")
        return buf


@dataclass(frozen=True)
class LayerResult:
    """One layer's comparisons, one entry per pair (i, j), i < j, in ``itertools.combinations`` order."""

    values: list[dict[str, float]]  # measure -> value
    floors: list[dict[str, dict[str, float]]]  # measure -> floor kind -> mean over the permutations
    spread: list[dict[str, Interval]]  # measure -> (lo, hi) or None
    samples: list[dict[str, np.ndarray]] = field(default_factory=list)  # measure -> value per half-sample / subset


def _pair_samples(
    i: int,
    j: int,
    gstats: Sequence[GramStats] | None,
    rdm_sums: Sequence[RdmStats | None] | None,
    reps: Sequence[RepStats] | None,
    cfg: MeasureConfig,
) -> dict[str, np.ndarray]:
    """Each spread measure of the pair (i, j) recomputed on every half-sample (``cka``, ``cka_debiased``,
    ``rsa``: [B]) or on every other isomorphism subset (``isomorphism``: [R])."""
    import numpy as np

    hs, want = cfg.half, set(cfg.spread_measures)
    out: dict[str, np.ndarray] = {}
    if hs is None:
        return out
    if gstats is not None:
        biased, unbiased = subset_cka(gstats[i], gstats[j], hs)
        out.update({m: v for m, v in (("cka", biased), ("cka_debiased", unbiased)) if m in want})
    if "rsa" in want and rdm_sums is not None:
        out["rsa"] = subset_rsa(rdm_sums[i], rdm_sums[j], hs)
    if "isomorphism" in want and reps is not None:
        out["isomorphism"] = np.array([eigenvector_similarity(a, b, cfg.iso_energy)
                                       for a, b in zip(reps[i].subset_spectra, reps[j].subset_spectra, strict=True)])
    return out


def spread_interval(
    measure: str, point: float, samples: np.ndarray, n: int, cfg: MeasureConfig, *, difference: bool = False
) -> Interval:
    """The interval of ``point`` from its ``samples`` (:func:`_pair_samples`; for a difference between two
    models, the differences of their samples): half-sampling, or the isomorphism subsets (see
    :mod:`stages.halfsamples`, Spread). ``difference``: the isomorphism interval is not cut at 0."""
    if measure == "isomorphism":
        return isomorphism_interval(point, samples, m=cfg.iso_size(n), n=n, confidence=cfg.confidence,
                                    distance=not difference)
    if cfg.half is None:
        return None
    return half_sample_interval(point, samples, cfg.half, cfg.confidence)


def _spreads(
    values: Sequence[Mapping[str, float]],
    pairs: Sequence[tuple[int, int]],
    grams: Sequence[Gram] | None,
    rdms: Sequence[RdmStats | None] | None,
    reps: Sequence[RepStats] | None,
    n: int,
    cfg: MeasureConfig,
) -> tuple[list[dict[str, Interval]], list[dict[str, np.ndarray]]]:
    """The intervals of every pair (i, j), i < j, and the samples they come from (see
    :mod:`stages.halfsamples`, Spread)."""
    hs = cfg.half
    if hs is None:
        return [{} for _ in values], [{} for _ in values]
    gstats = [gram_stats(g, hs) for g in grams] if grams is not None else None
    rdm_sums = [rdm_stats(r.z, hs) if r is not None else None for r in rdms] if rdms is not None else None
    samples = [_pair_samples(i, j, gstats, rdm_sums, reps, cfg) for i, j in pairs]
    intervals = [{m: spread_interval(m, values[p].get(m, math.nan), v, n, cfg) for m, v in samples[p].items()}
                 for p in range(len(pairs))]
    return intervals, samples


def evaluate_layer(
    xs: Sequence[Any],
    cfg: MeasureConfig,
    perms: Sequence[FloorPerms | None] | None = None,
    work: Workspace | None = None,
) -> LayerResult:
    """Every requested measure of every pair ``(i, j)``, i < j, of one layer's representations, with
    their floors (``perms``: each representation's floor permutations, aligned with ``xs``; None: no
    floors) and spreads (``cfg.half``). ``work``: buffers kept by the caller across layers."""
    import numpy as np

    work = work if work is not None else Workspace()
    want = set(cfg.measures)
    pairs = list(itertools.combinations(range(len(xs)), 2))
    n = int(np.shape(xs[0])[0])
    values: list[dict[str, float]] = [{} for _ in pairs]
    stats = None
    if want & {"cka", "cka_debiased"}:
        stats = [cka_stats(x, work.get("centred", i, np.shape(x))) for i, x in enumerate(xs)]
        for p, (i, j) in enumerate(pairs):
            values[p]["cka"], values[p]["cka_debiased"] = cka_pair(stats[i], stats[j], debiased="cka_debiased" in want)
    reps = None
    if want & {"rsa", "isomorphism"}:
        reps = [rep_stats(x, cfg, work.get("rdms", i, (n, n)) if "rsa" in want else None) for i, x in enumerate(xs)]
    if reps is not None:
        for p, (i, j) in enumerate(pairs):
            values[p].update(pair_measures(reps[i], reps[j], cfg))
    values = [{m: v[m] for m in cfg.measures if m in v} for v in values]
    if (perms is None or not cfg.floor_measures) and cfg.half is None:
        return LayerResult(values, [{} for _ in pairs], [{} for _ in pairs])
    order = cfg.row_order if cfg.row_order is not None else np.arange(n)
    grams = None
    if stats is not None:
        grams = [gram_from_stats(s, order, work.get("grams", i, (n, n))) for i, s in enumerate(stats)]
    rdms = [None if r.rsa is None else RdmStats(r.rsa) for r in reps] if reps is not None and "rsa" in want else None
    floors: list[dict[str, dict[str, float]]] = [{} for _ in pairs]
    if perms is not None and cfg.floor_measures:
        floors = layer_floors(grams, rdms, perms, order, cfg, work)
    intervals, samples = _spreads(values, pairs, grams, rdms, reps, n, cfg)
    return LayerResult(values, floors, intervals, samples)


def language_pairs(languages: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair (a, b), a before b in ``languages``."""
    return list(itertools.combinations(languages, 2))


LayerGetter = Callable[[str, int], Any]  # (language, layer) -> [n, d] array
LengthGetter = Callable[[str], Any]  # language -> [n] token counts


@dataclass
class PairwiseResult:
    """Per measure and pair, one entry per layer: values, floors (per kind) and intervals."""

    values: dict[str, dict[str, list[float]]]  # measure -> "a-b" -> [value per layer]
    floors: dict[str, dict[str, dict[str, list[float]]]]  # measure -> kind -> "a-b" -> [...]
    spread: dict[str, dict[str, list[list[float] | None]]]  # measure -> "a-b" -> [[lo, hi] or None per layer]
    # measure -> "a-b" -> per layer, the values on each half-sample (isomorphism: each other subset)
    samples: dict[str, dict[str, list[np.ndarray | None]]] = field(default_factory=dict)


def pairwise_by_layer(
    get: LayerGetter,
    languages: Sequence[str],
    n_layers: int,
    cfg: MeasureConfig,
    should_stop: Callable[[], bool] | None = None,
    lengths: LengthGetter | None = None,
) -> PairwiseResult:
    """Every requested measure, its floors and spreads, for every pair of ``languages``, per layer.

    Layer-major: at each layer every language's statistics are computed once and then every pair is
    compared, so memory holds one layer's representations and caches at a time. The floors'
    permutations (per language, from its token ``lengths``) are drawn once and used at every layer.
    """

    pairs = [f"{a}-{b}" for a, b in language_pairs(languages)]
    perms: list[FloorPerms | None] | None = None
    if cfg.floor_measures:
        if lengths is None:
            raise ValueError("floors need the sentences' token lengths; pass lengths or set floor_seeds: 0")
        perms = [[length_matched_permutation(lengths(lang), (cfg.seed, 2, s)) for s in range(cfg.floor_seeds)]
                 for lang in languages]
    result = PairwiseResult(
        {m: {p: [] for p in pairs} for m in cfg.measures},
        {m: {kind: {p: [] for p in pairs} for kind in FLOOR_KINDS} for m in cfg.floor_measures},
        {m: {p: [] for p in pairs} for m in cfg.spread_measures},
        {m: {p: [] for p in pairs} for m in cfg.spread_measures},
    )
    work = Workspace()  # the arrays of one layer, reused by the next
    for layer in range(n_layers):
        if should_stop is not None and should_stop():
            raise StageInterrupted("similarity: stop requested (nothing to checkpoint, the stage reruns)")
        lr = evaluate_layer([get(lang, layer) for lang in languages], cfg, perms, work)
        for p, pair in enumerate(pairs):
            for m, v in lr.values[p].items():
                result.values[m][pair].append(v)
            for m, kinds in lr.floors[p].items():
                for kind, v in kinds.items():
                    result.floors[m][kind][pair].append(v)
            for m in cfg.spread_measures:
                iv = lr.spread[p].get(m)
                result.spread[m][pair].append(None if iv is None else [iv[0], iv[1]])
                result.samples[m][pair].append(lr.samples[p].get(m) if lr.samples else None)
    return result


def spread_difference(
    model: PairwiseResult, full: PairwiseResult, n: int, cfg: MeasureConfig
) -> dict[str, dict[str, list[list[float] | None]]]:
    """``{measure: {"a-b": [[lo, hi] or None per layer]}}``: the paired interval of ``model`` minus ``full``
    for every pair and measure both have, from the same half-samples (or isomorphism subsets) of the same
    sentences (:func:`difference_interval`); None where either value or sample is missing or not finite."""
    out: dict[str, dict[str, list[list[float] | None]]] = {}
    for measure, per_pair in model.samples.items():
        theirs = full.samples.get(measure, {})
        for pair, layers in per_pair.items():
            if pair not in theirs:
                continue
            row: list[list[float] | None] = []
            for layer, (mine, other) in enumerate(zip(layers, theirs[pair], strict=True)):
                point = model.values[measure][pair][layer] - full.values[measure][pair][layer]
                iv = None if mine is None or other is None else \
                    spread_interval(measure, point, mine - other, n, cfg, difference=True)
                row.append(None if iv is None else [iv[0], iv[1]])
            out.setdefault(measure, {})[pair] = row
    return out
