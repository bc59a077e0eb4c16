"""Stage ``similarity``: how alike two languages' representations are, layer by layer (docs/methods.md 10).

Inputs: ``encodings`` artifacts (stage ``encode``), one per model variant and one per subnetwork
language. They are grouped by the ``variant`` (and ``language``) of their ``meta.json``, not by the
input they arrive on: ``encodings`` takes any of them; ``subnetworks``, ``base`` and ``random`` are
optional extra slots for specs that produce the variants in separate stages.

Representations compared, for a model and a pair of languages (a, b) at layer l: the pooled hidden
states ``X`` [n, d] of a's sentences and ``Y`` of b's (the same sentences, translated). For the
subnetwork model, a's sentences go through a's subnetwork and b's through b's.

What is computed, per model, pair and layer: the measures ``cka``, ``cka_debiased``, ``rsa`` and
``isomorphism`` (:mod:`stages.measures`, where each is defined); their floors (``floors``: the measure
between sentences that are not translations of each other, ``shuffled`` exactly and ``length_matched``
over seeded permutations), intervals (``spread``: half-samples of the sentences; for isomorphism, other
subsets) and the paired intervals of each model minus the full model (``spread_difference``), defined in
:mod:`stages.resampling` and :mod:`stages.halfsamples`; :mod:`stages.pairwise` runs them layer by layer
over every pair. This module is the stage: its parameters, the grouping of the encodings artifacts (read
by :mod:`stages.formats.encodings`) and similarity.json.

Layer by layer (``layer_by_layer``, ``layer_by_layer_debiased``): per language with a subnetwork, linear
and debiased CKA of every full-model layer against every subnetwork layer, on that language's sentences
(one cross product per cell gives both).

Encodings (``encodings``): what encode recorded about cutting sentences at its ``max_length``, copied
from each artifact's meta.json for the languages read from it (a subnetwork's: its own language only): a
cut sentence is compared with an uncut translation, so its pair is not fully parallel.

Output ``metrics`` (type ``metrics``): ``similarity.json``::

    {"languages": [...], "reference": "en", "layers": [0, ..., L],
     "models": ["full", "subnetwork", "base", "random"],          # those present, in this order
     "pairwise": {"<model>": {"<measure>": {"<a>-<b>": [one value per layer]}}},
     "layer_by_layer": {"<lang>": [[(L+1) x (L+1) linear CKA: rows = full-model layers,
                                    columns = that language's subnetwork layers]]},
     "layer_by_layer_measure": "cka",                      # the estimator of layer_by_layer
     "layer_by_layer_debiased": {"<lang>": [[the same cells, debiased CKA]]},
     "isomorphism_method": "...", "n": 1000,
     "floors": {"<model>": {"<measure>": {"length_matched": {"<a>-<b>": [one value per layer]},
                                          "shuffled": {"<a>-<b>": [...]}}}},   # cka, cka_debiased, rsa
     "floors_method": "...",
     "spread": {"<model>": {"<measure>": {"<a>-<b>": [[lo, hi] or null, one per layer]}}},
     "spread_difference": {"<model>-full": {"<measure>": {"<a>-<b>": [[lo, hi] or null, one per layer]}}},
                                                           # model: subnetwork, base, random (those present)
     "bootstrap": {"resamples": 200, "confidence": 0.95, "unit": "sentences", "method": "...",
                   "groups": 100},
     "encodings": {"<variant>" or "subnetwork:<lang>": {"max_length": 512, "truncated": {"<lang>": 3},
                                                         "truncated_total": 3, "n": 1000}}}

Pairs are every unordered pair ``a-b`` with a before b in ``languages``; floors permute b's rows.
A value that cannot be computed (a constant representation) is ``null``. ``floors`` is ``{}`` with
``floor_seeds: 0``; ``spread`` and ``spread_difference`` are ``{}`` with ``bootstrap: 0``, and
``spread_difference`` is also ``{}`` without a full model. In ``encodings``, ``truncated`` holds the
languages read from that artifact and ``truncated_total`` their sum; all three encode entries are ``null``
for an artifact whose encode recorded none (encode version 1).

Version 2: ``floors``, ``spread``, ``bootstrap``, ``isomorphism_variant``; needs encode version 2
(``<lang>.lengths.npy``) unless ``floor_seeds`` is 0. Version 3: ``spread_difference``, ``encodings``,
``layer_by_layer_measure``, ``layer_by_layer_debiased``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageParams, stage
from stages._io import effective_seed, write_json
from stages.formats.encodings import Encodings, load_encodings
from stages.formats.metrics import SIMILARITY_JSON, finite_or_none
from stages.formats.names import FULL, MEASURES, SUBNETWORK, VARIANTS, Measure
from stages.halfsamples import bootstrap_description, half_samples
from stages.measures import isomorphism_description, layer_cka_matrices
from stages.pairwise import LayerGetter, LengthGetter, MeasureConfig, PairwiseResult, pairwise_by_layer, spread_difference
from stages.resampling import FLOORS_METHOD

if TYPE_CHECKING:
    import numpy as np


class SimilarityParams(StageParams):
    """Parameters of the ``similarity`` stage."""

    reference: str = Field("en", description="Reference language of the study's curves (must be encoded).")
    languages: list[str] | None = Field(None, description="Languages to compare, in order; None: the encodings'.")
    measures: list[Measure] = Field(default_factory=lambda: list(MEASURES), min_length=1,
                                    description="Measures to compute (cka, cka_debiased, rsa, isomorphism).")
    rsa_method: Literal["pearson", "spearman"] = Field("pearson", description="Correlation of the RDM triangles.")
    isomorphism_variant: Literal["paper", "authors_code"] = Field(
        "paper", description="paper: k-NN graphs of centred cosine vectors, largest Laplacian eigenvalues; "
        "authors_code: as the authors' script (normalise, centre, normalise; 1-NN; smallest eigenvalues)."
    )
    isomorphism_k: int | None = Field(
        None, ge=1, description="Nearest neighbours per sentence in the isomorphism graphs; None: 10 (paper) or "
        "1 (authors_code)."
    )
    isomorphism_energy: float = Field(0.9, gt=0.0, le=1.0, description="Share of the Laplacian spectrum that "
                                      "fixes how many eigenvalues are compared.")
    isomorphism_max_sentences: int | None = Field(
        500, ge=3, description="Seeded subset of sentences for the isomorphism graphs (the eigendecomposition is "
        "cubic: ~0.04 s at 500, ~0.3 s at 1000 per language and layer on 2 cores); None: all."
    )
    isomorphism_resamples: int = Field(
        10, ge=0, description="Other seeded subsets of the same size for the isomorphism spread (one more "
        "eigendecomposition each per language and layer; no spread when the subset is every sentence); 0: none."
    )
    floor_seeds: int = Field(
        3, ge=0, description="Seeded length-matched permutations (the floor is their mean; the shuffled floor is "
        "exact); 0: no floors (then encodings without <lang>.lengths.npy are accepted)."
    )
    bootstrap: int = Field(
        200, ge=0, description="Half-samples of the sentences for the spreads (an even number: they come in "
        "complementary pairs); 0: no spreads."
    )
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Coverage of the spread intervals.")
    layer_by_layer: bool = Field(True, description="Compute the full x subnetwork layer CKA matrices.")
    seed: int | None = Field(None, description="Seed of the isomorphism subsets, the floors' permutations and the "
                             "half-samples; None: the job's seed.")

    @field_validator("measures")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"measures: duplicates in {v}")
        return v

    @field_validator("bootstrap")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"bootstrap: use an even number of half-samples (they come in complementary pairs), "
                             f"e.g. {v + 1}, or 0")
        return v

    @property
    def iso_k(self) -> int:
        """The neighbourhood size of the isomorphism graphs (the variant's default when not set)."""
        if self.isomorphism_k is not None:
            return self.isomorphism_k
        return 1 if self.isomorphism_variant == "authors_code" else 10


# --------------------------------------------------------------------------------------------------
# Encodings, grouped by model
# --------------------------------------------------------------------------------------------------


def group_encodings(items: Sequence[Encodings]) -> tuple[dict[str, Encodings], dict[str, Encodings]]:
    """(variant -> artifact for full/base/random, language -> subnetwork artifact); duplicates are errors."""
    models: dict[str, Encodings] = {}
    subnets: dict[str, Encodings] = {}
    for e in items:
        if e.variant == SUBNETWORK:
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
) -> tuple[list[str], LayerGetter, LengthGetter]:
    """The languages a model covers and how to read a language's layer and token lengths (subnetwork:
    its own mask's artifact)."""
    if model == SUBNETWORK:
        return ([lang for lang in languages if lang in subnets], lambda lang, layer: subnets[lang].layer(lang, layer),
                lambda lang: subnets[lang].lengths(lang))
    enc = models[model]
    return list(languages), lambda lang, layer: enc.layer(lang, layer), enc.lengths


def _check_lengths(lengths: LengthGetter, languages: Sequence[str], n: int) -> None:
    """Every language's token lengths exist and hold one count per sentence (before any work starts)."""
    for lang in languages:
        shape = tuple(lengths(lang).shape)
        if shape != (n,):
            raise ValueError(f"{lang}.lengths.npy holds shape {shape}, expected ({n},): re-run encode")


def _measure_config(params: SimilarityParams, n: int, seed: int) -> tuple[MeasureConfig, int]:
    """The measures' configuration (subsets, half-samples) and the isomorphism subset size."""
    import numpy as np

    iso_rows = None
    m_iso = n
    if params.isomorphism_max_sentences is not None and n > params.isomorphism_max_sentences:
        m_iso = params.isomorphism_max_sentences
        iso_rows = np.sort(np.random.default_rng(seed).choice(n, size=m_iso, replace=False))
    iso_subsets: tuple[Any, ...] = ()
    if "isomorphism" in params.measures and params.bootstrap > 0 and m_iso < n:
        iso_subsets = tuple(np.sort(np.random.default_rng((seed, 4, r)).choice(n, size=m_iso, replace=False))
                            for r in range(params.isomorphism_resamples))
    half = half_samples(n, params.bootstrap, (seed, 3)) if params.bootstrap > 0 else None
    cfg = MeasureConfig(tuple(params.measures), params.rsa_method, params.iso_k, params.isomorphism_energy, iso_rows,
                        params.isomorphism_variant, iso_subsets, params.floor_seeds, seed, half, params.confidence)
    return cfg, m_iso


def truncation_record(meta: Mapping[str, Any], languages: Sequence[str], n: int) -> dict[str, Any]:
    """What encode recorded about cutting sentences at ``max_length`` (its meta.json ``max_length``,
    ``truncated`` {lang: sentences cut}), for the ``languages`` this stage reads from the artifact:
    their counts and, as ``truncated_total``, the sum of those. ``null`` where encode recorded nothing
    (encode version 1)."""
    counts = meta.get("truncated")
    kept = {lang: int(counts[lang]) for lang in languages if lang in counts} if isinstance(counts, Mapping) else None
    return {"max_length": meta.get("max_length"), "truncated": kept,
            "truncated_total": None if kept is None else sum(kept.values()), "n": n}


def encodings_records(
    models: Mapping[str, Encodings], subnets: Mapping[str, Encodings], languages: Sequence[str], n: int
) -> dict[str, dict[str, Any]]:
    """similarity.json ``encodings``: :func:`truncation_record` of every artifact read, keyed by its
    variant (``subnetwork:<lang>`` for a language's subnetwork, which is read for that language only)."""
    out = {variant: truncation_record(models[variant].meta, languages, n) for variant in VARIANTS if variant in models}
    for lang in (x for x in languages if x in subnets):
        out[f"subnetwork:{lang}"] = truncation_record(subnets[lang].meta, [lang], n)
    return out


def _layer_by_layer(
    models: Mapping[str, Encodings], subnets: Mapping[str, Encodings], languages: Sequence[str], n_layers: int
) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]:
    """(linear, debiased) CKA of every full-model layer against every layer of each language's subnetwork,
    on that language's sentences (empty without a full model)."""
    biased: dict[str, list[list[float]]] = {}
    debiased: dict[str, list[list[float]]] = {}
    if FULL not in models:
        return biased, debiased
    full = models[FULL]
    buffers: list[np.ndarray] = []  # one language's centred layers, reused by the next
    for lang in (lang for lang in languages if lang in subnets):
        xs = [full.layer(lang, i) for i in range(n_layers)]
        ys = [subnets[lang].layer(lang, j) for j in range(n_layers)]
        biased[lang], debiased[lang] = layer_cka_matrices(xs, ys, buffers)
    return biased, debiased


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
        first = next((e for e in items if e.variant == FULL), items[0])
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
    version="3",  # 2: floors, spread, bootstrap, isomorphism_variant (reads <lang>.lengths.npy);
    # 3: spread_difference, encodings, layer_by_layer_debiased
)
def similarity_stage(params: SimilarityParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """CKA, debiased CKA, RSA and isomorphism between languages, per layer, for every model."""
    import time

    items = _gather(inputs)
    models, subnets = group_encodings(items)
    languages = _languages(params, items)
    n, n_layers = _check_consistent(items, languages)
    seed = effective_seed(ctx.seed, params.seed)
    cfg, m_iso = _measure_config(params, n, seed)
    present = [m for m in VARIANTS if (m == SUBNETWORK and subnets) or m in models]
    readers = {model: _representations(model, languages, models, subnets) for model in present}
    if cfg.floor_measures:
        for langs, _, lengths in readers.values():
            _check_lengths(lengths, langs, n)
    pairwise: dict[str, Any] = {}
    floors: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    spread_diff: dict[str, Any] = {}
    full_result: PairwiseResult | None = None  # "full" comes first in VARIANTS: every other model is paired with it
    start = time.perf_counter()
    for model, (langs, get, lengths) in readers.items():
        res = pairwise_by_layer(get, langs, n_layers, cfg, should_stop=ctx.stop_requested.is_set, lengths=lengths)
        pairwise[model] = res.values
        if res.floors:
            floors[model] = res.floors
        if res.spread:
            spread[model] = res.spread
        if model == FULL:
            full_result = res
        elif full_result is not None and res.samples:
            spread_diff[f"{model}-{FULL}"] = spread_difference(res, full_result, n, cfg)
        ctx.log({f"seconds/{model}": time.perf_counter() - start})
    layer_by_layer, layer_by_layer_debiased = (_layer_by_layer(models, subnets, languages, n_layers)
                                               if params.layer_by_layer else ({}, {}))
    result = {
        "languages": languages,
        "reference": params.reference,
        "layers": list(range(n_layers)),
        "models": present,
        "pairwise": pairwise,
        "layer_by_layer": layer_by_layer,
        "layer_by_layer_measure": "cka",
        "layer_by_layer_debiased": layer_by_layer_debiased,
        "isomorphism_method": isomorphism_description(params.iso_k, params.isomorphism_energy, m_iso,
                                                      params.isomorphism_variant, n=n,
                                                      resamples=params.isomorphism_resamples if cfg.half else 0),
        "n": n,
        "floors": floors,
        "floors_method": FLOORS_METHOD if cfg.floor_measures else "none (floor_seeds: 0, or no measure with a floor)",
        "spread": spread,
        "spread_difference": spread_diff,
        "bootstrap": bootstrap_description(cfg.half, params.bootstrap, params.confidence),
        "encodings": encodings_records(models, subnets, languages, n),
    }
    out = ctx.output_dir("metrics")
    write_json(out / SIMILARITY_JSON, finite_or_none(result))
    ctx.log(_reference_means(pairwise, params.reference))
    meta = {
        "languages": languages,
        "reference": params.reference,
        "models": present,
        "subnetwork_languages": [lang for lang in languages if lang in subnets],
        "measures": list(params.measures),
        "rsa_method": params.rsa_method,
        "isomorphism_variant": params.isomorphism_variant,
        "floor_seeds": params.floor_seeds,
        "bootstrap": params.bootstrap,
        "n": n,
        "layers": n_layers,
        "seconds": time.perf_counter() - start,
    }
    return {"metrics": meta}


SIMILARITY: StageDef = similarity_stage
