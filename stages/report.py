"""Stage ``report``: the study's figures (PNG + PDF) and one report page, drawn from artifacts by lineage.

Every input is optional; a figure whose data are missing is skipped and listed on the page as
"not available" with the reason. The figures (see :mod:`stages.figures`, one pure function each):

=================================  ==============================  =====================================
file (``.png`` + ``.pdf``)          inputs                          what it shows
=================================  ==============================  =====================================
``perplexity_before_after``        ``model`` (metrics.json)         eval perplexity per language, before
                                                                    and after MLM fine-tuning
``training_curve``                 ``model``                        eval perplexity per evaluation step
``cross_eval_perplexity``          ``cross_eval``                   rows = subnetwork (+ full model),
                                                                    columns = eval language
``cross_eval_relative``            ``cross_eval``                   the same / the full model's row
``jaccard_kept_heads``             ``mask_stats``                   Jaccard of kept heads, per pair
``masked_per_layer``               ``mask_stats``                   proportion of heads masked per
                                                                    layer: mean over languages + each
``pruning_trajectories``           ``masks`` (trajectory.json)      heads kept vs perplexity, threshold
``cka_layer_by_layer``             ``similarity`` (layer_by_layer)  linear CKA full-model layer x
                                                                    subnetwork layer, per language
``<measure>_curves``               ``similarity``                   reference vs each language per
                                                                    layer; full, subnetworks, controls
``<measure>_differences``          ``similarity``                   subnetworks - full model, per
                                                                    language (``layer`` or layer mean)
``<measure>_vs_syntactic_distance`` ``similarity``,                 similarity vs URIEL syntactic
                                   ``language_distance``            distance, Pearson r
``token_overlap``                  ``token_overlap``                token overlap with the reference
=================================  ==============================  =====================================

Output ``figures`` (type ``figures``): the figure files, ``report.html`` (self-contained: relative
``<img>`` links, inline CSS), ``report.md`` and ``figures.json`` (figure -> files, title, caption,
source artifact versions and producing jobs; the figures not available and why; the inputs'
lineage). Files are deterministic: the same inputs give byte-identical files with the same
matplotlib version (no dates, no software versions in PNG/PDF metadata, no timestamps on the page).

matplotlib is imported only while the stage runs (the engine imports this module to plan studies).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from orchestrator.stage import Input, Inputs, ResolvedInput, StageContext, StageDef, StageParams, stage
from stages._io import optional_input, read_json, write_json

FULL = "full"
SUBNETWORK = "subnetwork"
MEASURES = ("cka", "cka_debiased", "rsa", "isomorphism")
# how the figures name a measure (isomorphism is a distance: lower = more alike)
MEASURE_LABELS = {"cka": "linear CKA", "cka_debiased": "debiased CKA", "rsa": "RSA",
                  "isomorphism": "isomorphism distance"}

# the one JSON file each single-artifact input must hold
FILES: dict[str, str] = {
    "model": "metrics.json",
    "cross_eval": "cross_eval.json",
    "mask_stats": "mask_stats.json",
    "similarity": "similarity.json",
    "token_overlap": "token_overlap.json",
    "language_distance": "language_distance.json",
}
INPUT_ORDER = ("model", "masks", "cross_eval", "mask_stats", "similarity", "token_overlap", "language_distance")


class ReportParams(StageParams):
    """Parameters of the ``report`` stage."""

    measure: str = Field(
        "cka", min_length=1,
        description="Similarity measure of similarity.json drawn as curves, differences and against syntactic "
        f"distance ({', '.join(MEASURES)}).",
    )
    layer: int | None = Field(
        None,
        description="Hidden-state layer (as numbered in similarity.json, 0 = embeddings) for the difference bars "
        "and the syntactic-distance scatter; None: the mean over all layers.",
    )
    title: str = Field(
        "Language-specific subnetworks of a multilingual masked language model", min_length=1,
        description="Title of the report page.",
    )


# --------------------------------------------------------------------------------------------------
# Reading the inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class MaskData:
    """One language's head-mask artifact as the report needs it."""

    language: str
    info: dict[str, Any]
    trajectory: list[dict[str, Any]] | None
    heads_kept: int
    total_heads: int
    source: ResolvedInput


@dataclass
class Study:
    """Every input that is present: the resolved artifact versions and their parsed JSON."""

    sources: dict[str, list[ResolvedInput]] = field(default_factory=dict)
    docs: dict[str, Any] = field(default_factory=dict)
    masks: list[MaskData] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return bool(self.sources.get(name))

    def languages(self) -> list[str]:
        """Every language any input mentions, in order of first appearance."""
        seen: list[str] = []
        for name in ("model", "cross_eval", "mask_stats", "similarity", "token_overlap", "language_distance"):
            doc = self.docs.get(name) or {}
            seen += list(doc.get("languages") or doc.get("cols") or [])
        seen += [m.language for m in self.masks]
        return [x for x in dict.fromkeys(seen) if x != FULL]


def load_study(inputs: Inputs) -> Study:
    """Read every present input (a missing file in a present input is an error: a mis-wired input)."""
    study = Study()
    for name, file in FILES.items():
        item = optional_input(inputs, name)
        if item is None:
            continue
        path = Path(item.path) / file
        if not path.is_file():
            raise ValueError(f"input {name!r} ({item.ref}) has no {file}: connect it to the output of the "
                             f"stage that writes {file}")
        study.sources[name] = [item]
        study.docs[name] = read_json(path)
    masks = inputs.get("masks")
    items = [masks] if isinstance(masks, ResolvedInput) else list(masks or [])
    study.masks = [read_mask(item) for item in items]
    if study.masks:
        study.sources["masks"] = items
    langs = [m.language for m in study.masks]
    if len(set(langs)) != len(langs):
        raise ValueError(f"two head masks for the same language: {langs}")
    return study


def read_mask(item: ResolvedInput) -> MaskData:
    """Language, mask.json, trajectory and head counts of one ``head-mask`` artifact."""
    from stages.prune import read_mask_dir

    mask, info = read_mask_dir(item.path)
    lang = item.point.get("language") or info.get("language") or item.metadata.get("language")
    if not lang:
        raise ValueError(f"head mask {item.ref} does not say its language (matrix point, mask.json, metadata)")
    traj_path = Path(item.path) / "trajectory.json"
    trajectory = read_json(traj_path) if traj_path.is_file() else None
    return MaskData(str(lang), info, trajectory, int((mask > 0.5).sum()), int(mask.size), item)


def check_params(study: Study, params: ReportParams) -> None:
    """The measure and layer must exist in similarity.json (when it is an input)."""
    doc = study.docs.get("similarity")
    if doc is None:
        return
    available = sorted({m for per_model in doc.get("pairwise", {}).values() for m in per_model})
    if params.measure not in available:
        raise ValueError(f"measure {params.measure!r} is not in similarity.json; it has: {', '.join(available)}")
    layers = list(doc.get("layers") or [])
    if params.layer is not None and params.layer not in layers:
        raise ValueError(f"layer {params.layer} is not in similarity.json; its layers: {layers}")


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
    return rows, cols, [[_ratio(v, f) for v, f in zip(row, full, strict=True)] for row in ppl]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def pair_curve(doc: Mapping[str, Any], model: str, measure: str, a: str, b: str) -> list[float | None] | None:
    """The per-layer values of ``measure`` between ``a`` and ``b`` for ``model`` (either key order)."""
    table = doc.get("pairwise", {}).get(model, {}).get(measure, {})
    return table.get(f"{a}-{b}", table.get(f"{b}-{a}"))


def curves(doc: Mapping[str, Any], measure: str) -> dict[str, dict[str, list[float | None]]]:
    """``{model: {language: curve of reference vs language}}`` for every model and language present."""
    ref = doc["reference"]
    out: dict[str, dict[str, list[float | None]]] = {}
    for model in doc.get("models") or list(doc.get("pairwise", {})):
        per_lang = {lang: pair_curve(doc, model, measure, ref, lang) for lang in doc["languages"] if lang != ref}
        per_lang = {lang: c for lang, c in per_lang.items() if c is not None}
        if per_lang:
            out[model] = per_lang
    return out


def at_layer(values: Sequence[float | None], layers: Sequence[int], layer: int | None) -> float:
    """The value at ``layer`` (a layer number of ``layers``), or the mean over layers when None."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if layer is None:
        return sum(finite) / len(finite) if finite else math.nan
    v = values[list(layers).index(layer)]
    return math.nan if v is None else float(v)


def where_text(layers: Sequence[int], layer: int | None) -> str:
    if layer is not None:
        return f"layer {layer}"
    return f"mean over layers {layers[0]}-{layers[-1]}" if layers else "mean over layers"


def heads_kept_table(study: Study) -> dict[str, tuple[int, int]]:
    """(kept, total) heads per language: from the masks, else mask_stats."""
    if study.masks:
        return {m.language: (m.heads_kept, m.total_heads) for m in study.masks}
    stats = study.docs.get("mask_stats") or {}
    total = int(stats.get("total_heads") or 0)
    return {lang: (int(n), total) for lang, n in (stats.get("heads_kept") or {}).items()}


# --------------------------------------------------------------------------------------------------
# Figure plan: each builder says what to draw (a function of stages.figures and its arguments),
# or why it cannot
# --------------------------------------------------------------------------------------------------


@dataclass
class Planned:
    """A figure to draw: ``stages.figures.<fn>(*args, **kwargs)``."""

    name: str
    title: str
    caption: str
    sources: tuple[str, ...]  # input names the data come from
    fn: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Missing:
    """A figure that is not drawn, and why."""

    name: str
    title: str
    reason: str


Builder = Callable[[Study, ReportParams, dict[str, str]], "Planned | Missing"]


def _absent(study: Study, name: str, title: str, *needed: str) -> Missing | None:
    lacking = [n for n in needed if not study.has(n)]
    if not lacking:
        return None
    noun = "input" if len(lacking) == 1 else "inputs"
    return Missing(name, title, f"not available: {noun} {', '.join(lacking)} missing")


def fig_perplexity(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "perplexity_before_after", "Perplexity before and after fine-tuning"
    if (m := _absent(study, name, title, "model")) is not None:
        return m
    doc = study.docs["model"]
    before = {k: v["perplexity"] for k, v in doc["before"].items()}
    after = {k: v["perplexity"] for k, v in doc["after"].items()}
    langs = list(doc.get("languages") or before)
    caption = (f"MLM perplexity on each language's test set (deterministic masks) before fine-tuning and at the "
               f"best checkpoint (step {doc.get('best_step')}, lowest mean eval loss over languages).")
    return Planned(name, title, caption, ("model",), "perplexity_before_after", (langs, before, after))


def fig_training_curve(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "training_curve", "Eval perplexity during fine-tuning"
    if (m := _absent(study, name, title, "model")) is not None:
        return m
    doc = study.docs["model"]
    history = doc.get("history") or []
    if len(history) < 2:
        return Missing(name, title, "not available: fewer than two evaluations in the model's metrics.json")
    langs = list(doc.get("languages") or history[0].get("languages", {}))
    caption = "Eval perplexity of every language at each evaluation step; dashed: the best checkpoint (kept)."
    return Planned(name, title, caption, ("model",), "training_curve", (history, langs, doc.get("best_step")),
                   {"colors": colors})


def fig_cross_eval(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "cross_eval_perplexity", "Cross-language perplexity of the subnetworks"
    if (m := _absent(study, name, title, "cross_eval")) is not None:
        return m
    rows, cols, values = cross_eval_matrix(study.docs["cross_eval"])
    caption = ("Perplexity of each language's subnetwork (rows; last row: the unpruned full model) on each "
               "language's test set (columns). Outlined: a subnetwork on its own language.")
    return Planned(name, title, caption, ("cross_eval",), "cross_eval_heatmap", (rows, cols, values))


def fig_cross_eval_relative(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "cross_eval_relative", "Cross-language perplexity relative to the full model"
    if (m := _absent(study, name, title, "cross_eval")) is not None:
        return m
    rows, cols, values = relative_matrix(study.docs["cross_eval"])
    caption = ("The cross-language perplexity divided by the full model's perplexity on the same eval language "
               "(column): 1 = no loss; red = the subnetwork is worse than the full model.")
    return Planned(name, title, caption, ("cross_eval",), "cross_eval_heatmap", (rows, cols, values),
                   {"relative": True})


def fig_jaccard(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "jaccard_kept_heads", "Overlap of the subnetworks (Jaccard of kept heads)"
    if (m := _absent(study, name, title, "mask_stats")) is not None:
        return m
    jac = study.docs["mask_stats"]["jaccard"]
    caption = "Jaccard index |A ∩ B| / |A ∪ B| of the sets of heads kept by two languages' subnetworks."
    return Planned(name, title, caption, ("mask_stats",), "jaccard_heatmap", (jac["labels"], jac["matrix"]))


def fig_masked_per_layer(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "masked_per_layer", "Proportion of heads masked per layer"
    if (m := _absent(study, name, title, "mask_stats")) is not None:
        return m
    stats = study.docs["mask_stats"]
    caption = ("Per layer (1 = first transformer layer): masked heads / heads in the layer, averaged over "
               "languages (black) and for each language (thin lines).")
    return Planned(name, title, caption, ("mask_stats",), "masked_per_layer",
                   (stats["masked_per_layer"], stats.get("masked_per_layer_by_language")), {"colors": colors})


def fig_trajectories(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "pruning_trajectories", "Pruning trajectories"
    if (m := _absent(study, name, title, "masks")) is not None:
        return m
    with_traj = [m for m in study.masks if m.trajectory]
    if not with_traj:
        return Missing(name, title, "not available: the head masks have no trajectory.json")
    trajectories = {m.language: m.trajectory for m in with_traj}
    thresholds = {m.language: m.info.get("threshold") for m in with_traj}
    caption = ("Heads kept vs perplexity on the language's own test set at each pruning step; crosses: the "
               "rejected step that ended pruning (perplexity above the threshold); the last accepted point is "
               "the subnetwork. Dashed: the threshold (unpruned perplexity x threshold factor).")
    return Planned(name, title, caption, ("masks",), "pruning_trajectories", (trajectories, thresholds),
                   {"colors": colors})


def fig_cka_heatmaps(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "cka_layer_by_layer", "Linear CKA: full model vs subnetwork, layer x layer"
    if (m := _absent(study, name, title, "similarity")) is not None:
        return m
    doc = study.docs["similarity"]
    lbl = doc.get("layer_by_layer") or {}
    if not lbl:
        return Missing(name, title, "not available: similarity.json has no layer_by_layer matrices")
    order = [lang for lang in doc.get("languages", []) if lang in lbl] + [k for k in lbl if k not in doc["languages"]]
    caption = ("For each language, linear CKA between every layer of the full model (rows) and every layer of "
               "that language's subnetwork (columns), on that language's sentences (0 = embeddings).")
    return Planned(name, title, caption, ("similarity",), "cka_layer_heatmaps",
                   ({lang: lbl[lang] for lang in order}, doc["layers"]))


def fig_curves(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    measure = params.measure
    name, title = f"{measure}_curves", f"Layer-by-layer {measure} with the reference language"
    if (m := _absent(study, name, title, "similarity")) is not None:
        return m
    doc = study.docs["similarity"]
    data = curves(doc, measure)
    if not data:
        return Missing(name, title, f"not available: similarity.json has no {measure} values for the reference")
    caption = (f"{measure} between the reference language ({doc['reference']}) and each language, per hidden "
               f"layer (0 = embeddings), on n = {doc.get('n')} parallel sentences: one panel per model "
               f"({', '.join(data)}; for the subnetworks each language goes through its own subnetwork); "
               f"controls dashed.{_iso_note(doc, measure)}")
    return Planned(name, title, caption, ("similarity",), "similarity_curves",
                   (doc["layers"], doc["reference"], data), {"measure": measure_label(measure), "colors": colors})


def measure_label(measure: str) -> str:
    return MEASURE_LABELS.get(measure, measure)


def _iso_note(doc: Mapping[str, Any], measure: str) -> str:
    method = doc.get("isomorphism_method")
    return f" Isomorphism method: {method}." if measure == "isomorphism" and method else ""


def fig_differences(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    measure = params.measure
    name, title = f"{measure}_differences", f"{measure}: subnetworks minus full model"
    if (m := _absent(study, name, title, "similarity")) is not None:
        return m
    doc = study.docs["similarity"]
    data = curves(doc, measure)
    if FULL not in data or SUBNETWORK not in data:
        return Missing(name, title, f"not available: similarity.json lacks {measure} of the full model or the "
                                    "subnetworks")
    layers, where = doc["layers"], where_text(doc["layers"], params.layer)
    diffs = {lang: at_layer(data[SUBNETWORK][lang], layers, params.layer) - at_layer(c, layers, params.layer)
             for lang, c in data[FULL].items() if lang in data[SUBNETWORK]}
    sign = ("Negative: the subnetworks' representations are more isomorphic to the reference's"
            if measure == "isomorphism" else "Positive: the subnetworks are more similar to the reference")
    caption = (f"{measure} with {doc['reference']} of the subnetworks minus that of the full model, per "
               f"language, {where} (parameter layer = {params.layer}). {sign} than the full model's."
               f"{_iso_note(doc, measure)}")
    return Planned(name, title, caption, ("similarity",), "similarity_differences", (diffs,),
                   {"reference": doc["reference"], "measure": measure_label(measure), "where": where})


def fig_vs_distance(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    measure = params.measure
    name, title = f"{measure}_vs_syntactic_distance", f"{measure} vs syntactic distance"
    if (m := _absent(study, name, title, "similarity", "language_distance")) is not None:
        return m
    sim, dist = study.docs["similarity"], study.docs["language_distance"]
    ref, dlangs = sim["reference"], list(dist["languages"])
    if ref not in dlangs:
        return Missing(name, title, f"not available: language_distance.json has no distances for {ref!r}")
    row = dist["syntactic"][dlangs.index(ref)]
    distance = {lang: row[i] for i, lang in enumerate(dlangs) if lang != ref and row[i] is not None}
    layers, where = sim["layers"], where_text(sim["layers"], params.layer)
    data = {model: {lang: at_layer(c, layers, params.layer) for lang, c in per.items()}
            for model, per in curves(sim, measure).items() if model in (FULL, SUBNETWORK)}
    if not data:
        return Missing(name, title, f"not available: similarity.json has no {measure} of the full model")
    caption = (f"Syntactic distance to {ref} (URIEL; method: {dist.get('method')}) against {measure} with {ref} "
               f"({where}); Pearson r per model in the legend.")
    return Planned(name, title, caption, ("similarity", "language_distance"), "similarity_vs_distance",
                   (distance, data), {"reference": ref, "measure": measure_label(measure), "where": where,
                                      "method": dist.get("method")})


def fig_token_overlap(study: Study, params: ReportParams, colors: dict[str, str]) -> Planned | Missing:
    name, title = "token_overlap", "Token overlap with the reference language"
    if (m := _absent(study, name, title, "token_overlap")) is not None:
        return m
    doc = study.docs["token_overlap"]
    ref = doc["reference"]
    order = [lang for lang in doc.get("languages") or doc["overlap"] if lang in doc["overlap"] and lang != ref]
    overlap = {lang: doc["overlap"][lang] for lang in order}
    caption = (f"Per parallel sentence, |token types of {ref} ∩ token types of the language| / |token types of "
               f"the language| (special tokens excluded), averaged over n = {doc.get('n')} sentences.")
    return Planned(name, title, caption, ("token_overlap",), "token_overlap_bars", (overlap,),
                   {"reference": ref, "n": doc.get("n"), "colors": colors})


BUILDERS: tuple[Builder, ...] = (
    fig_perplexity, fig_training_curve, fig_cross_eval, fig_cross_eval_relative, fig_jaccard,
    fig_masked_per_layer, fig_trajectories, fig_cka_heatmaps, fig_curves, fig_differences, fig_vs_distance,
    fig_token_overlap,
)


def plan_figures(study: Study, params: ReportParams, colors: dict[str, str]) -> list[Planned | Missing]:
    return [build(study, params, colors) for build in BUILDERS]


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------


def source_records(study: Study, names: Sequence[str]) -> list[dict[str, Any]]:
    """The artifact versions behind ``names`` (input names), for captions and figures.json."""
    return [{"input": n, "ref": s.ref, "job_key": s.job_key, "point": dict(s.point)}
            for n in names for s in study.sources.get(n, [])]


def lineage_rows(study: Study) -> list[list[str]]:
    rows = []
    for name in INPUT_ORDER:
        for s in study.sources.get(name, []):
            point = ", ".join(f"{k}={v}" for k, v in sorted(s.point.items())) or "-"
            rows.append([name, s.ref, s.type, s.job_key, point])
    return rows


def _num(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def language_rows(study: Study) -> tuple[list[str], list[list[str]]]:
    """Key numbers per language: perplexity before/after, heads kept, own-language relative perplexity."""
    model = study.docs.get("model") or {}
    before, after = model.get("before") or {}, model.get("after") or {}
    heads = heads_kept_table(study)
    own = _own_relative(study.docs.get("cross_eval"))
    header = ["language", "perplexity before", "perplexity after", "heads kept", "own-language ppl / full"]
    rows = []
    for lang in study.languages():
        kept = heads.get(lang)
        rows.append([
            lang,
            _num((before.get(lang) or {}).get("perplexity")),
            _num((after.get(lang) or {}).get("perplexity")),
            f"{kept[0]}/{kept[1]}" if kept else "-",
            _num(own.get(lang), ".3f"),
        ])
    return header, rows


def _own_relative(doc: Mapping[str, Any] | None) -> dict[str, float | None]:
    if not doc:
        return {}
    rows, cols, rel = relative_matrix(doc)
    return {lang: rel[rows.index(lang)][cols.index(lang)] for lang in rows if lang in cols}


def summary_lines(study: Study) -> list[str]:
    lines = []
    model = study.docs.get("model")
    if model and model.get("mean_loss_before") is not None:
        lines.append(f"Mean eval loss over languages: {_num(model['mean_loss_before'], '.4f')} before, "
                     f"{_num(model.get('mean_loss_after'), '.4f')} after fine-tuning (step {model.get('best_step')}).")
    stats = study.docs.get("mask_stats")
    if stats and stats.get("jaccard_mean") is not None:
        lines.append(f"Jaccard of kept heads: mean {_num(stats['jaccard_mean'], '.3f')} (min "
                     f"{_num(stats.get('jaccard_min'), '.3f')}, max {_num(stats.get('jaccard_max'), '.3f')}).")
    if stats and stats.get("heads_kept_by_all") is not None:
        lines.append(f"Heads kept by every language: {stats['heads_kept_by_all']} of {stats.get('total_heads')}; "
                     f"by at least one: {stats.get('heads_kept_by_any')}.")
    return lines


@dataclass
class Page:
    title: str
    params: dict[str, Any]
    drawn: list[tuple[Planned, list[str], list[dict[str, Any]]]]
    missing: list[Missing]
    lineage: list[list[str]]
    table: tuple[list[str], list[list[str]]]
    summary: list[str]


def _sources_text(records: Sequence[Mapping[str, Any]]) -> str:
    by_input: dict[str, list[str]] = {}
    for r in records:
        by_input.setdefault(r["input"], []).append(r["ref"])
    return "; ".join(f"{name}: {', '.join(refs)}" for name, refs in by_input.items())


def render_markdown(page: Page) -> str:
    out = [f"# {page.title}", "", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in page.params.items()), ""]
    out += ["## Key numbers", ""] + [f"- {line}" for line in page.summary] + [""]
    header, rows = page.table
    out += _md_table(header, rows) + [""]
    out += ["## Figures", ""]
    for plan, files, records in page.drawn:
        png = next(f for f in files if f.endswith(".png"))
        pdf = next(f for f in files if f.endswith(".pdf"))
        out += [f"### {plan.title}", "", f"![{plan.title}]({png})", "",
                f"{plan.caption} Data: {_sources_text(records)}. [PDF]({pdf})", ""]
    if page.missing:
        out += ["## Not available", ""] + [f"- `{m.name}` ({m.title}): {m.reason}" for m in page.missing] + [""]
    out += ["## Inputs (lineage)", ""]
    out += _md_table(["input", "artifact version", "type", "producing job", "matrix point"], page.lineage)
    return "\n".join(out) + "\n"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
figure { margin: 2em 0; border-top: 1px solid #ddd; padding-top: 1em; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.92em; color: #333; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
code, .ref { font-family: ui-monospace, monospace; font-size: 0.9em; }
"""


def render_html(page: Page) -> str:
    e = html.escape
    params = ", ".join(f"<code>{e(f'{k}={v}')}</code>" for k, v in page.params.items())
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(page.title)}</title>",
        f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{e(page.title)}</h1>", f"<p>Parameters: {params}</p>",
        "<h2>Key numbers</h2>", "<ul>", *[f"<li>{e(s)}</li>" for s in page.summary], "</ul>",
        _html_table(*page.table), "<h2>Figures</h2>",
    ]
    for plan, files, records in page.drawn:
        parts.append(_html_figure(plan, files, records))
    if page.missing:
        parts += ["<h2>Not available</h2>", "<ul>"]
        parts += [f"<li><code>{e(m.name)}</code> ({e(m.title)}): {e(m.reason)}</li>" for m in page.missing]
        parts.append("</ul>")
    parts += ["<h2>Inputs (lineage)</h2>",
              _html_table(["input", "artifact version", "type", "producing job", "matrix point"], page.lineage),
              "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _html_figure(plan: Planned, files: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    e = html.escape
    png = next(f for f in files if f.endswith(".png"))
    pdf = next(f for f in files if f.endswith(".pdf"))
    refs = "; ".join(f'{e(r["input"])}: <span class="ref" title="job {e(r["job_key"])}">{e(r["ref"])}</span>'
                     for r in records)
    return (f'<figure id="{e(plan.name)}">\n<h3>{e(plan.title)}</h3>\n'
            f'<img src="{e(png)}" alt="{e(plan.title)}">\n'
            f"<figcaption>{e(plan.caption)}<br>Data: {refs}. Files: <a href=\"{e(png)}\">PNG</a>, "
            f'<a href="{e(pdf)}">PDF</a>.</figcaption>\n</figure>')


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------


@stage(
    "report",
    params=ReportParams,
    inputs={
        "model": Input(type="model", optional=True),
        "masks": Input(type="head-mask", many=True, optional=True),
        "cross_eval": Input(type="metrics", optional=True),
        "mask_stats": Input(type="metrics", optional=True),
        "similarity": Input(type="metrics", optional=True),
        "token_overlap": Input(type="metrics", optional=True),
        "language_distance": Input(type="metrics", optional=True),
    },
    outputs={"figures": "figures"},
    version="1",
)
def report_stage(params: ReportParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """The study's figures (PNG + PDF) and a report page (HTML + Markdown) with each figure's lineage."""
    from stages import figures as F

    study = load_study(inputs)
    if not study.sources:
        raise ValueError("report: no input is connected; connect at least one of " + ", ".join(INPUT_ORDER))
    check_params(study, params)
    colors = F.language_colors(study.languages())
    plans = plan_figures(study, params, colors)
    out = ctx.output_dir("figures")
    drawn: list[tuple[Planned, list[str], list[dict[str, Any]]]] = []
    with F.style():
        for plan in plans:
            if isinstance(plan, Planned):
                fig = getattr(F, plan.fn)(*plan.args, **plan.kwargs)
                drawn.append((plan, F.save(fig, out, plan.name), source_records(study, plan.sources)))
    missing = [p for p in plans if isinstance(p, Missing)]
    page = Page(params.title, params.model_dump(mode="json"), drawn, missing, lineage_rows(study),
                language_rows(study), summary_lines(study))
    write_json(out / "figures.json", figures_index(page, study))
    (out / "report.md").write_text(render_markdown(page), encoding="utf-8")
    (out / "report.html").write_text(render_html(page), encoding="utf-8")
    return {"figures": {
        "figures": [p.name for p, _, _ in drawn],
        "not_available": {m.name: m.reason for m in missing},
        "measure": params.measure,
        "layer": params.layer,
    }}


def figures_index(page: Page, study: Study) -> dict[str, Any]:
    """figures.json: every figure's files, title, caption and source artifact versions."""
    return {
        "figures": {p.name: {"files": files, "title": p.title, "caption": p.caption, "sources": records}
                    for p, files, records in page.drawn},
        "not_available": {m.name: m.reason for m in page.missing},
        "inputs": source_records(study, INPUT_ORDER),
        "params": page.params,
        "pages": ["report.html", "report.md"],
    }


REPORT: StageDef = report_stage
