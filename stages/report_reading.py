"""What the report reads of its inputs (:class:`stages.report_inputs.ReportInputs`): the key names of every
upstream JSON file, the readers of their optional extras, the shaping of their matrices, and
similarity.json at the report's measure and layer (:class:`SimView`).

Everything the report draws or says comes through here, so the key names of every upstream format live
in this module and nowhere else. Each reader is small and returns plain Python (lists, dicts, tuples),
and treats a key it does not find as the mark of an input written by an older version of its stage, not
as an error: the extra is None or empty, which the figure plan (:mod:`stages.report_plan`) turns into a
"Not shown" line and the text (:mod:`stages.report_text`) into a sentence saying what is unknown.
Matrices come out in the study's order of languages
(:meth:`stages.report_inputs.ReportInputs.languages`), the full model's row last; a cross_eval.json
written with its axes swapped is transposed.

Extras read when present: similarity.json ``floors``, ``spread``, ``spread_difference`` (``subnetwork-full``),
``bootstrap``, ``encodings`` (encode's ``max_length`` and ``truncated`` per artifact read) and
``layer_by_layer_debiased``; cross_eval.json ``eval_split``, ``perplexity_interval`` and ``random``; mask_stats.json
``jaccard_chance``; the model's metrics.json ``eval_split`` and an interval next to each perplexity
(:data:`MODEL_INTERVAL_KEY`); ``ctx.provenance``
(:data:`orchestrator.stage.PROVENANCE`).

Nothing here imports numpy or a plotting library at import time (the engine imports the stage
module, and with it this one, to plan studies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stages.formats.names import FLOOR_KINDS, FULL, LENGTH_FLOOR, SHUFFLED_FLOOR, SUBNETWORK
from stages.report_inputs import ReportInputs

# how the figures name a measure (isomorphism is a distance: lower = more alike)
MEASURE_LABELS = {"cka": "biased linear CKA", "cka_debiased": "debiased CKA", "rsa": "RSA",
                  "isomorphism": "isomorphism distance"}
FLOOR_LABELS = {LENGTH_FLOOR: "the length-matched floor", SHUFFLED_FLOOR: "the shuffled-row floor"}
# where train's metrics.json keeps the interval of each perplexity, next to it (before[lang], after[lang])
MODEL_INTERVAL_KEY = "perplexity_interval"
PAIRED = f"{SUBNETWORK}-{FULL}"  # similarity.json spread_difference key of subnetwork minus full model

Interval = tuple[float, float]


# --------------------------------------------------------------------------------------------------
# Readers of the optional extras (each small: the key names live here and nowhere else)
# --------------------------------------------------------------------------------------------------


def as_interval(value: Any) -> Interval | None:
    """``[lo, hi]`` as a pair of floats; None for anything else (missing, null bounds)."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in value):
        return None
    return (float(value[0]), float(value[1]))


def model_interval(entry: Mapping[str, Any]) -> Interval | None:
    """The interval of one perplexity of the model's metrics.json (``entry``: ``before[lang]`` or
    ``after[lang]``), as the train stage records it (:data:`MODEL_INTERVAL_KEY`)."""
    return as_interval(entry.get(MODEL_INTERVAL_KEY))


def model_intervals(doc: Mapping[str, Any], when: str) -> dict[str, Interval]:
    """``{language: interval}`` of the model's ``before`` or ``after`` perplexities, where recorded."""
    found = {lang: model_interval(entry) for lang, entry in (doc.get(when) or {}).items()}
    return {lang: iv for lang, iv in found.items() if iv is not None}


def split_note(doc: Mapping[str, Any]) -> str:
    """Which test split an artifact's numbers come from, in words."""
    split = doc.get("eval_split")
    if split == "report":
        return ("Test split: report (the half of each test set kept out of checkpoint selection, head "
                "importance and the pruning threshold).")
    if split:
        return f"Test split: {split}."
    return ("Test split not recorded (an older artifact): these numbers come from the same test chunks that "
            "chose the checkpoint and the heads.")


Truncation = tuple[str, int, Any, Any, list[str]]  # language, sentences cut, max_length, n, encodings


def truncations(doc: Mapping[str, Any]) -> list[Truncation]:
    """Sentences cut at ``max_length`` before encoding, from similarity.json ``encodings`` (encode's
    record, per artifact read: ``{"<variant>" or "subnetwork:<lang>": {"max_length", "truncated":
    {lang: n}, "n"}}``): one entry per language and (count, limit, n), naming the encodings that share
    it, in the study's language order. Artifacts that recorded nothing (``truncated`` null) are skipped."""
    groups: dict[tuple[str, int, Any, Any], list[str]] = {}
    for name, entry in (doc.get("encodings") or {}).items():
        if not isinstance(entry, Mapping):
            continue
        for lang, k in (entry.get("truncated") or {}).items():
            if isinstance(k, int | float) and k > 0:
                key = (str(lang), int(k), entry.get("max_length"), entry.get("n") or doc.get("n"))
                groups.setdefault(key, []).append(str(name))
    rank = {lang: i for i, lang in enumerate(doc.get("languages") or [])}
    return sorted(((*key, names) for key, names in groups.items()), key=lambda t: rank.get(t[0], len(rank)))


def jaccard_chance(stats: Mapping[str, Any]) -> tuple[list[list[Any]], list[list[Any]] | None] | None:
    """(chance Jaccard matrix, its interval matrix or None) of mask_stats.json, if it has them, with
    rows and columns in the order of the Jaccard matrix's labels."""
    chance = stats.get("jaccard_chance") or {}
    if not chance.get("mean"):
        return None
    labels = list(stats["jaccard"]["labels"])
    own = list(chance.get("labels") or labels)
    idx = [own.index(x) for x in labels]
    interval = chance.get("interval")
    return ([[chance["mean"][i][j] for j in idx] for i in idx],
            None if interval is None else [[interval[i][j] for j in idx] for i in idx])


@dataclass
class RandomMasks:
    """cross_eval.json ``random``: size-matched random masks, rows = whose subnetwork's sizes."""

    rows: list[str]
    cols: list[str]  # eval languages
    mean: list[list[Any]]
    std: list[list[Any]] | None
    relative: list[list[Any]]
    seeds: int


def random_masks(doc: Mapping[str, Any]) -> RandomMasks | None:
    """The size-matched random masks of cross_eval.json (columns: its eval languages), if any."""
    rnd = doc.get("random") or {}
    if not rnd.get("rows") or not rnd.get("perplexity_mean"):
        return None
    seeds = rnd.get("seeds")
    n_seeds = len(seeds) if isinstance(seeds, list) else int(seeds or 0)
    cols = list(rnd.get("cols") or cross_eval_matrix(doc)[1])
    relative = rnd.get("relative_to_random") or _own_over_random(doc, rnd, cols)
    return RandomMasks(list(rnd["rows"]), cols, rnd["perplexity_mean"], rnd.get("perplexity_std"), relative, n_seeds)


def _own_over_random(doc: Mapping[str, Any], rnd: Mapping[str, Any], cols: Sequence[str]) -> list[list[float | None]]:
    rows, doc_cols, ppl = cross_eval_matrix(doc)
    return [[ratio(ppl[rows.index(r)][doc_cols.index(c)], m) for c, m in zip(cols, means, strict=True)]
            for r, means in zip(rnd["rows"], rnd["perplexity_mean"], strict=True)]


def bootstrap_text(doc: Mapping[str, Any]) -> str:
    """similarity.json ``bootstrap`` in words: ``95% bootstrap interval over sentences (200 resamples,
    half-sampling)``; the full method is in similarity.json."""
    b = doc.get("bootstrap") or {}
    if not b:
        return "interval"
    conf = b.get("confidence")
    unit = str(b.get("unit") or "sentences")
    method = str(b.get("method") or "")
    details = ", ".join(x for x in (f"{b['resamples']} resamples" if b.get("resamples") else "",
                                    "half-sampling" if method.startswith("half-sampling") else "") if x)
    return (f"{conf:.0%} " if isinstance(conf, int | float) else "") + \
        f"bootstrap interval over {unit if unit.endswith('s') else unit + 's'}" + (f" ({details})" if details else "")


def interval_text(doc: Mapping[str, Any]) -> str:
    """How an artifact's perplexity intervals were computed (its ``interval`` entry), in words."""
    iv = doc.get("interval") or {}
    level, resamples = iv.get("level"), iv.get("resamples")
    return ((f"{level:.0%} " if isinstance(level, int | float) else "") + "intervals"
            + (f" ({resamples} bootstrap resamples of the eval chunks)" if resamples else ""))


def confidence(doc: Mapping[str, Any]) -> float:
    conf = (doc.get("bootstrap") or {}).get("confidence")
    return float(conf) if isinstance(conf, int | float) else 0.95


# --------------------------------------------------------------------------------------------------
# Data shaping (plain Python)
# --------------------------------------------------------------------------------------------------


def cross_eval_matrix(doc: Mapping[str, Any], key: str = "perplexity") -> tuple[list[str], list[str], list[list]]:
    """(rows = subnetworks, cols = eval languages, matrix) of cross_eval.json, transposed if the file
    says its rows are eval languages."""
    rows, cols, values = list(doc["rows"]), list(doc["cols"]), doc[key]
    if doc.get("row_axis") == "eval_language" and doc.get("col_axis") == "subnetwork":
        return cols, rows, [list(r) for r in zip(*values, strict=True)]
    return rows, cols, [list(r) for r in values]


def relative_matrix(doc: Mapping[str, Any]) -> tuple[list[str], list[str], list[list]]:
    """Perplexity relative to the full model's row (from the file, else computed)."""
    if doc.get("relative_perplexity") is not None:
        return cross_eval_matrix(doc, "relative_perplexity")
    rows, cols, ppl = cross_eval_matrix(doc)
    if FULL not in rows:
        raise ValueError("cross_eval.json has neither relative_perplexity nor a 'full' row")
    full = ppl[rows.index(FULL)]
    return rows, cols, [[ratio(v, f) for v, f in zip(row, full, strict=True)] for row in ppl]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


def in_order(labels: Sequence[str], order: Sequence[str]) -> list[int]:
    """Indices of ``labels`` sorted into the study's ``order`` (unknown labels after, the full
    model's row last)."""
    rank = {x: i for i, x in enumerate(order)}
    return sorted(range(len(labels)), key=lambda i: (labels[i] == FULL, rank.get(labels[i], len(rank))))


def reordered(rows: Sequence[str], cols: Sequence[str], matrix: Sequence[Sequence[Any]], order: Sequence[str]
              ) -> tuple[list[str], list[str], list[list[Any]]]:
    """A labelled matrix with rows and columns in the study's order."""
    ri, ci = in_order(rows, order), in_order(cols, order)
    return [rows[i] for i in ri], [cols[j] for j in ci], [[matrix[i][j] for j in ci] for i in ri]


def pair_value(table: Mapping[str, Any], a: str, b: str) -> Any:
    """The entry of pair ``a-b`` (either key order) of a similarity.json table."""
    return table.get(f"{a}-{b}", table.get(f"{b}-{a}"))


def pair_curve(doc: Mapping[str, Any], model: str, measure: str, a: str, b: str) -> list[float | None] | None:
    """The per-layer values of ``measure`` between ``a`` and ``b`` for ``model`` (either key order)."""
    return pair_value(doc.get("pairwise", {}).get(model, {}).get(measure, {}), a, b)


def reference_entries(doc: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{model: {language: entry of reference vs language}}`` from ``{model: {"a-b": entry}}``."""
    ref = doc["reference"]
    out: dict[str, dict[str, Any]] = {}
    for model, table in tables.items():
        per_lang = {lang: pair_value(table, ref, lang) for lang in doc["languages"] if lang != ref}
        per_lang = {lang: v for lang, v in per_lang.items() if v is not None}
        if per_lang:
            out[model] = per_lang
    return out


def curves(doc: Mapping[str, Any], measure: str) -> dict[str, dict[str, list[float | None]]]:
    """``{model: {language: curve of reference vs language}}`` for every model and language present."""
    pairwise = doc.get("pairwise", {})
    models = doc.get("models") or list(pairwise)
    return reference_entries(doc, {m: pairwise.get(m, {}).get(measure, {}) for m in models})


def floor_curves(doc: Mapping[str, Any], measure: str) -> dict[str, dict[str, dict[str, list[float | None]]]]:
    """``{model: {floor kind: {language: curve}}}`` of similarity.json ``floors`` for ``measure``."""
    out: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for kind in FLOOR_KINDS:
        tables = {m: (per.get(measure) or {}).get(kind) or {} for m, per in (doc.get("floors") or {}).items()}
        for model, per_lang in reference_entries(doc, tables).items():
            out.setdefault(model, {})[kind] = per_lang
    return out


def spread_curves(doc: Mapping[str, Any], measure: str) -> dict[str, dict[str, list[Any]]]:
    """``{model: {language: [[lo, hi] per layer]}}`` of similarity.json ``spread`` for ``measure``."""
    return reference_entries(doc, {m: per.get(measure) or {} for m, per in (doc.get("spread") or {}).items()})


def difference_curves(doc: Mapping[str, Any], measure: str) -> dict[str, dict[str, list[Any]]]:
    """``{"<model>-full": {language: [[lo, hi] per layer]}}`` of similarity.json ``spread_difference`` for
    ``measure``: the paired intervals of a model minus the full model (similarity version 3)."""
    tables = (doc.get("spread_difference") or {}).items()
    return reference_entries(doc, {key: per.get(measure) or {} for key, per in tables})


def at_layer(values: Sequence[float | None], layers: Sequence[int], layer: int | None) -> float:
    """The value at ``layer`` (a layer number of ``layers``), or the mean over layers when None."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if layer is None:
        return sum(finite) / len(finite) if finite else math.nan
    v = values[list(layers).index(layer)]
    return math.nan if v is None else float(v)


def interval_at_layer(spread: Sequence[Any], layers: Sequence[int], layer: int | None) -> Interval | None:
    """The interval at ``layer``; for the mean over layers, the mean of the bounds (as wide as the
    mean's own interval when layers move together, wider otherwise)."""
    pairs = [as_interval(s) for s in spread]
    lo = at_layer([p[0] if p else None for p in pairs], layers, layer)
    hi = at_layer([p[1] if p else None for p in pairs], layers, layer)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def where_text(layers: Sequence[int], layer: int | None) -> str:
    if layer is not None:
        return f"layer {layer}"
    return f"mean over layers {layers[0]}-{layers[-1]}" if layers else "mean over layers"


def normalisation_text(info: Mapping[str, Any]) -> str:
    """How the pruning run normalised head importance, as mask.json records it."""
    over = info.get("normalize_over")
    if over is None:
        return " Importance normalisation: not recorded."
    steps = [what for what, on in (("each layer's L2 norm", info.get("normalize_layers")),
                                   ("a global min-max", info.get("normalize_global"))) if on]
    heads = "all heads" if over == "all" else "the heads still kept"
    how = " then ".join(steps) if steps else "none"
    return f" Importance normalisation: {how}, over {heads} (normalize_over={over})."


def layer_matrices(doc: Mapping[str, Any], measure: str) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    """(full x subnetwork layer matrices, their measure, what an older similarity.json lacked) for the
    report's ``measure``: biased CKA (``layer_by_layer``, measure ``layer_by_layer_measure``) for ``cka``;
    for any other measure debiased CKA (``layer_by_layer_debiased``, similarity version 3: the matrices
    are CKA only, and biased CKA is far above 0 for unrelated representations), else biased with a gap."""
    biased = doc.get("layer_by_layer") or {}
    biased_measure = str(doc.get("layer_by_layer_measure") or "cka")
    if measure == "cka":
        return biased, biased_measure, ()
    if doc.get("layer_by_layer_debiased"):
        return doc["layer_by_layer_debiased"], "cka_debiased", ()
    gap = (f"similarity.json has no debiased layer-by-layer matrices (an older version): the full x subnetwork "
           f"layer heatmaps show {measure_label(biased_measure)}, not {measure_label(measure)}.")
    return biased, biased_measure, (gap,) if biased else ()


def heads_kept_table(study: ReportInputs) -> dict[str, tuple[int, int]]:
    """(kept, total) heads per language: from the masks, else mask_stats."""
    if study.masks:
        return {m.language: (m.heads_kept, m.total_heads) for m in study.masks}
    stats = study.docs.get("mask_stats") or {}
    total = int(stats.get("total_heads") or 0)
    return {lang: (int(n), total) for lang, n in (stats.get("heads_kept") or {}).items()}


@dataclass
class SimView:
    """similarity.json at the report's measure and layer (or layer mean), per model and language."""

    reference: str
    measure: str
    where: str
    values: dict[str, dict[str, float]]  # model -> language -> value
    intervals: dict[str, dict[str, Interval]]  # model -> language -> bootstrap interval
    floors: dict[str, dict[str, dict[str, float]]]  # kind -> model -> language -> floor
    confidence: float
    has_floors: bool
    has_spread: bool
    # "<model>-full" -> language -> paired interval of the difference (similarity.json spread_difference)
    paired: dict[str, dict[str, Interval]] = field(default_factory=dict)
    has_paired: bool = False  # similarity.json records the paired intervals of subnetwork - full

    @property
    def higher_is_closer(self) -> bool:
        return self.measure != "isomorphism"


def sim_view(doc: Mapping[str, Any], measure: str, layer: int | None) -> SimView:
    layers = doc["layers"]
    values = {m: {lang: at_layer(c, layers, layer) for lang, c in per.items()} for m, per in curves(doc, measure).items()}
    intervals: dict[str, dict[str, Interval]] = {}
    for model, per in spread_curves(doc, measure).items():
        found = {lang: iv for lang, s in per.items() if (iv := interval_at_layer(s, layers, layer)) is not None}
        if found:
            intervals[model] = found
    floors: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in FLOOR_KINDS}
    for model, per_kind in floor_curves(doc, measure).items():
        for kind, per in per_kind.items():
            floors[kind][model] = {lang: at_layer(c, layers, layer) for lang, c in per.items()}
    diffs = difference_curves(doc, measure)
    paired = {key: {lang: iv for lang, s in per.items() if (iv := interval_at_layer(s, layers, layer)) is not None}
              for key, per in diffs.items()}
    return SimView(doc["reference"], measure, where_text(layers, layer), values, intervals, floors,
                   confidence(doc), any(floors[k] for k in FLOOR_KINDS), bool(intervals), paired, PAIRED in diffs)


def differences(view: SimView) -> dict[str, tuple[float, Interval | None]]:
    """Subnetwork minus full model per language, with an interval: the paired one similarity.json
    records (``spread_difference``: the same half-samples for both models), else an approximate one,
    the two bootstrap half-widths added in quadrature (as if independent; both come from the same
    sentences, so this overstates the uncertainty of the difference). For the mean over layers, the
    mean of the per-layer bounds (:func:`interval_at_layer`)."""
    full, sub = view.values.get(FULL, {}), view.values.get(SUBNETWORK, {})
    out: dict[str, tuple[float, Interval | None]] = {}
    for lang in (x for x in full if x in sub):
        d = sub[lang] - full[lang]
        if view.has_paired:
            out[lang] = (d, view.paired[PAIRED].get(lang))
            continue
        ivs = (view.intervals.get(SUBNETWORK, {}).get(lang), view.intervals.get(FULL, {}).get(lang))
        if ivs[0] is None or ivs[1] is None:
            out[lang] = (d, None)
            continue
        half = math.hypot((ivs[0][1] - ivs[0][0]) / 2, (ivs[1][1] - ivs[1][0]) / 2)
        out[lang] = (d, (d - half, d + half))
    return out


def difference_label(view: SimView) -> str:
    """What kind of interval :func:`differences` gives: ``paired interval`` or ``approximate interval``."""
    return "paired interval" if view.has_paired else "approximate interval"


def floor_differences(view: SimView) -> dict[str, float]:
    """Subnetwork minus full model of the length-matched floors, per language."""
    full = view.floors[LENGTH_FLOOR].get(FULL, {})
    sub = view.floors[LENGTH_FLOOR].get(SUBNETWORK, {})
    return {lang: sub[lang] - full[lang] for lang in full if lang in sub}


def measure_label(measure: str) -> str:
    """How the figures and the text name a measure."""
    return MEASURE_LABELS.get(measure, measure)
