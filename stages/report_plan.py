"""The report's figure plan: for each figure, what to draw, or why it cannot be drawn.

Each builder is a pure function of the inputs (:class:`stages.report_inputs.ReportInputs`), the report's
choice of measure and layer, and the languages' colours. It returns a :class:`Planned` (a figure
function of :mod:`stages.figures`, the function itself, and its arguments, with the title, the caption
and the inputs the data come from) or a :class:`Missing` (the reason). A builder imports its figure
function when it runs (matplotlib is imported with it: never when the engine plans a study), so a
renamed figure fails as soon as the plan is made. Planning is kept apart from drawing: what a figure
shows, what its caption says and what an older input lacked are decided here from data alone, and
the stage draws every plan the same way (:func:`stages.figures.style`, :func:`stages.figures.save`)
and lists every Missing with its reason.

Captions are generated, never written ahead of the data: they name the test split the numbers come
from (:func:`stages.report_reading.split_note`), the interval method and the floors drawn. An input
written by an older version of its stage gives a figure drawn without the extra it lacks and a line
in ``gaps``, which the page lists under "Not shown".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stages.formats.names import FULL, LENGTH_FLOOR, SHUFFLED_FLOOR, SUBNETWORK
from stages.report_inputs import ReportChoice, ReportInputs
from stages.report_reading import (
    SimView,
    bootstrap_text,
    cross_eval_matrix,
    curves,
    difference_label,
    differences,
    floor_curves,
    floor_differences,
    in_order,
    interval_text,
    jaccard_chance,
    layer_matrices,
    measure_label,
    model_intervals,
    normalisation_text,
    random_masks,
    relative_matrix,
    reordered,
    sim_view,
    split_note,
    spread_curves,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RANDOM_ROW = "random ({} size)"  # row label of a language's size-matched random masks in the cross-eval heatmap


# --------------------------------------------------------------------------------------------------
# Figure plan: each builder says what to draw (a figure function and its arguments), or why it cannot
# --------------------------------------------------------------------------------------------------


@dataclass
class Planned:
    """A figure to draw: ``fn(*args, **kwargs)``, ``fn`` a figure function of :mod:`stages.figures` (the
    function itself: a renamed figure fails when the plan is made, not when it is drawn). ``gaps``: what
    an older input lacked, so the figure is drawn without it (also listed under "Not shown")."""

    name: str
    title: str
    caption: str
    sources: tuple[str, ...]  # input names the data come from
    fn: Callable[..., Figure]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    gaps: tuple[str, ...] = ()


@dataclass
class Missing:
    """A figure that is not drawn, and why."""

    name: str
    title: str
    reason: str


Builder = Callable[[ReportInputs, ReportChoice, dict[str, str]], "Planned | Missing"]


def _absent(study: ReportInputs, name: str, title: str, *needed: str) -> Missing | None:
    lacking = [n for n in needed if not study.has(n)]
    if not lacking:
        return None
    noun = "input" if len(lacking) == 1 else "inputs"
    return Missing(name, title, f"not available: {noun} {', '.join(lacking)} missing")


def _split_gap(doc: Mapping[str, Any], file: str) -> tuple[str, ...]:
    return () if doc.get("eval_split") else (f"{file} does not record its test split (an older version).",)


def fig_perplexity(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.finetuning import perplexity_before_after

    name, title = "perplexity_before_after", "Perplexity before and after fine-tuning"
    if (m := _absent(study, name, title, "model")) is not None:
        return m
    doc = study.docs["model"]
    before = {k: v["perplexity"] for k, v in doc["before"].items()}
    after = {k: v["perplexity"] for k, v in doc["after"].items()}
    langs = [x for x in colors if x in before] + [x for x in before if x not in colors]
    iv_before, iv_after = model_intervals(doc, "before"), model_intervals(doc, "after")
    gaps = _split_gap(doc, "The model's metrics.json")
    if not (iv_before or iv_after):
        gaps += ("The model's metrics.json has no perplexity intervals (an older version): perplexities are "
                 "shown without them.",)
    caption = (f"MLM perplexity on each language's test set (deterministic masks) before fine-tuning and at the "
               f"best checkpoint (step {doc.get('best_step')}, lowest mean eval loss over languages"
               + (f" on the {doc['selection_split']} split" if doc.get("selection_split") else "") + ")."
               + (f" Thin black lines: {interval_text(doc)}." if iv_before or iv_after else "")
               + f" {split_note(doc)}")
    return Planned(name, title, caption, ("model",), perplexity_before_after, (langs, before, after),
                   {"intervals_before": iv_before, "intervals_after": iv_after, "split": doc.get("eval_split")},
                   gaps)


def fig_training_curve(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.finetuning import training_curve

    name, title = "training_curve", "Eval perplexity during fine-tuning"
    if (m := _absent(study, name, title, "model")) is not None:
        return m
    doc = study.docs["model"]
    history = doc.get("history") or []
    if len(history) < 2:
        return Missing(name, title, "not available: fewer than two evaluations in the model's metrics.json")
    langs = list(doc.get("languages") or history[0].get("languages", {}))
    caption = "Eval perplexity of every language at each evaluation step; dashed: the best checkpoint (kept)."
    if doc.get("eval_split"):
        caption += f" Lines: the {doc['eval_split']} split" + (
            f"; the checkpoint was chosen on the {doc['selection_split']} split, which is not drawn."
            if doc.get("selection_split") else ".")
    else:
        caption += " Test split not recorded: these evaluations also chose the checkpoint."
    return Planned(name, title, caption, ("model",), training_curve, (history, langs, doc.get("best_step")),
                   {"colors": colors})


def _random_rows(doc: Mapping[str, Any], cols: Sequence[str], order: Sequence[str]
                 ) -> tuple[list[str], list[list[Any]], list[list[Any]]]:
    """The cross-eval heatmap's random-mask rows: labels, mean perplexities and their sd, in the
    study's order and in the columns' order."""
    rnd = random_masks(doc)
    if rnd is None:
        return [], [], []
    std = rnd.std or [[None] * len(rnd.cols) for _ in rnd.rows]
    idx = [rnd.cols.index(c) if c in rnd.cols else None for c in cols]
    rows = [rnd.rows[i] for i in in_order(rnd.rows, order)]
    pick = [rnd.rows.index(r) for r in rows]
    return ([RANDOM_ROW.format(r) for r in rows], [[None if j is None else rnd.mean[i][j] for j in idx] for i in pick],
            [[None if j is None else std[i][j] for j in idx] for i in pick])


def fig_cross_eval(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.subnetworks import cross_eval_heatmap

    name, title = "cross_eval_perplexity", "Cross-language perplexity of the subnetworks"
    if (m := _absent(study, name, title, "cross_eval")) is not None:
        return m
    doc = study.docs["cross_eval"]
    rows, cols, values = reordered(*cross_eval_matrix(doc), list(colors))
    r_rows, r_mean, r_std = _random_rows(doc, cols, list(colors))
    spread = [[None] * len(cols) for _ in rows] + r_std
    rnd = random_masks(doc)
    caption = ("Perplexity of each language's subnetwork (rows; then the unpruned full model) on each language's "
               "test set (columns). Outlined: a subnetwork on its own language."
               + (f" Rows 'random (xx size)': random masks with as many heads in each layer as xx's subnetwork, "
                  f"mean ± standard deviation over {rnd.seeds} seeds." if rnd else "") + f" {split_note(doc)}")
    gaps = _split_gap(doc, "cross_eval.json")
    if rnd is None:
        gaps += ("cross_eval.json has no size-matched random masks (an older version): no random-mask rows and no "
                 "comparison with them.",)
    return Planned(name, title, caption, ("cross_eval",), cross_eval_heatmap, (rows + r_rows, cols, values + r_mean),
                   {"spread": spread if rnd else None, "split": doc.get("eval_split")}, gaps)


def fig_cross_eval_relative(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.subnetworks import cross_eval_heatmap

    name, title = "cross_eval_relative", "Cross-language perplexity relative to the full model"
    if (m := _absent(study, name, title, "cross_eval")) is not None:
        return m
    doc = study.docs["cross_eval"]
    rows, cols, values = reordered(*relative_matrix(doc), list(colors))
    caption = ("The cross-language perplexity divided by the full model's perplexity on the same eval language "
               "(column): 1 = no loss; red = the subnetwork is worse than the full model. The colour bar spans the "
               f"data, with white at 1. {split_note(doc)}")
    return Planned(name, title, caption, ("cross_eval",), cross_eval_heatmap, (rows, cols, values),
                   {"relative": True, "split": doc.get("eval_split")})


def fig_cross_eval_vs_random(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.subnetworks import cross_eval_heatmap

    name, title = "cross_eval_vs_random", "Subnetworks relative to size-matched random masks"
    if (m := _absent(study, name, title, "cross_eval")) is not None:
        return m
    doc = study.docs["cross_eval"]
    rnd = random_masks(doc)
    if rnd is None:
        return Missing(name, title, "not available: cross_eval.json has no size-matched random masks (key 'random'; "
                                    "written by an older cross_eval)")
    rows, cols, values = reordered(rnd.rows, rnd.cols, rnd.relative, list(colors))
    caption = (f"Each subnetwork's perplexity (rows: whose subnetwork) on each eval language (columns), divided by "
               f"the mean perplexity of random masks with as many heads in each layer ({rnd.seeds} seeds). Below 1 "
               "(blue): the pruned heads do better than random heads of the same sizes; the outlined cell is the "
               f"language pruning chose the heads on. The colour bar spans the data, with white at 1. {split_note(doc)}")
    return Planned(name, title, caption, ("cross_eval",), cross_eval_heatmap, (rows, cols, values),
                   {"relative": True, "baseline": "size-matched random masks", "split": doc.get("eval_split")})


def fig_jaccard(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.subnetworks import jaccard_heatmap

    name, title = "jaccard_kept_heads", "Overlap of the subnetworks (Jaccard of kept heads)"
    if (m := _absent(study, name, title, "mask_stats")) is not None:
        return m
    stats = study.docs["mask_stats"]
    labels, matrix = list(stats["jaccard"]["labels"]), stats["jaccard"]["matrix"]
    idx = in_order(labels, list(colors))
    chance = jaccard_chance(stats)
    caption = "Jaccard index |A ∩ B| / |A ∪ B| of the sets of heads kept by two languages' subnetworks."
    kwargs: dict[str, Any] = {}
    gaps: tuple[str, ...] = ()
    if chance is not None:
        mean, interval = chance  # in the order of the Jaccard matrix's labels
        kwargs = {"chance": [[mean[i][j] for j in idx] for i in idx],
                  "chance_interval": None if interval is None else [[interval[i][j] for j in idx] for i in idx]}
        caption += (" Right: observed minus the Jaccard expected of random masks of the same sizes (chance); "
                    "*: outside the chance interval.")
    else:
        gaps = ("mask_stats.json has no chance Jaccard (an older version): the Jaccard matrix is drawn without the "
                "comparison with random masks of the same sizes.",)
    return Planned(name, title, caption, ("mask_stats",), jaccard_heatmap,
                   ([labels[i] for i in idx], [[matrix[i][j] for j in idx] for i in idx]), kwargs, gaps)


def fig_masked_per_layer(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.subnetworks import masked_per_layer

    name, title = "masked_per_layer", "Proportion of heads masked per layer"
    if (m := _absent(study, name, title, "mask_stats")) is not None:
        return m
    stats = study.docs["mask_stats"]
    caption = ("Per layer (1 = first transformer layer): masked heads / heads in the layer, averaged over "
               "languages (black) and for each language (thin lines, each with its own marker and nudged sideways "
               "so that identical lines stay visible; the legend names a line identical to an earlier one).")
    return Planned(name, title, caption, ("mask_stats",), masked_per_layer,
                   (stats["masked_per_layer"], stats.get("masked_per_layer_by_language")), {"colors": colors})


def fig_trajectories(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.subnetworks import pruning_trajectories

    name, title = "pruning_trajectories", "Pruning trajectories"
    if (m := _absent(study, name, title, "masks")) is not None:
        return m
    with_traj = [m for m in study.masks if m.trajectory]
    if not with_traj:
        return Missing(name, title, "not available: the head masks have no trajectory.json")
    trajectories = {m.language: m.trajectory for m in with_traj}
    thresholds = {m.language: m.info.get("threshold") for m in with_traj}
    split = with_traj[0].info.get("eval_split")
    caption = ("Heads kept vs perplexity on the language's own test set at each pruning step; crosses: the "
               "rejected step that ended pruning (perplexity above the threshold); the last accepted point is "
               "the subnetwork. Dashed: the threshold (unpruned perplexity x threshold factor)."
               + (f" Test split: {split}." if split else "") + normalisation_text(with_traj[0].info))
    return Planned(name, title, caption, ("masks",), pruning_trajectories, (trajectories, thresholds),
                   {"colors": colors})


def fig_cka_heatmaps(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.similarity import cka_layer_heatmaps

    name, title = "cka_layer_by_layer", "CKA: full model vs subnetwork, layer x layer"
    if (m := _absent(study, name, title, "similarity")) is not None:
        return m
    doc = study.docs["similarity"]
    lbl, measure, gaps = layer_matrices(doc, params.measure)
    if not lbl:
        return Missing(name, title, "not available: similarity.json has no layer_by_layer matrices")
    label = measure_label(measure)
    order = [lang for lang in colors if lang in lbl] + [k for k in lbl if k not in colors]
    caption = (f"For each language, {label} between every layer of the full model (rows) and every layer of "
               "that language's subnetwork (columns), on that language's sentences (0 = embeddings).")
    return Planned(name, title, caption, ("similarity",), cka_layer_heatmaps,
                   ({lang: lbl[lang] for lang in order}, doc["layers"]), {"measure": label}, gaps)


FLOOR_SENTENCE = ("Dotted, in each language's colour: the length-matched floor, the same measure between sentences "
                  "that are not translations of each other but have matching lengths, so similarity at or below it "
                  "could come from sentence length alone.")
SHUFFLED_SENTENCE = ("Grey band: the shuffled-row floor (the measure after shuffling one side's sentences: its value "
                     "for unrelated representations), as a range over languages.")


def _similarity_gaps(doc: Mapping[str, Any], measure: str, floors: Mapping[str, Any], spreads: Mapping[str, Any]
                     ) -> tuple[str, ...]:
    gaps = []
    if not floors:
        gaps.append(f"similarity.json has no floors for {measure} (none, or an older version): its figures are drawn "
                    "without the length-matched and shuffled-row floors.")
    if not spreads:
        gaps.append(f"similarity.json has no bootstrap spread for {measure} (none, or an older version): similarity "
                    "values are shown without intervals.")
    return tuple(gaps)


def fig_curves(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.similarity import similarity_curves

    measure = params.measure
    name, title = f"{measure}_curves", f"Layer-by-layer {measure} with the reference language"
    if (m := _absent(study, name, title, "similarity")) is not None:
        return m
    doc = study.docs["similarity"]
    data = curves(doc, measure)
    if not data:
        return Missing(name, title, f"not available: similarity.json has no {measure} values for the reference")
    floors, spreads = floor_curves(doc, measure), spread_curves(doc, measure)
    extras = (f" Shaded: the {bootstrap_text(doc)}." if spreads else "") + \
        (f" {FLOOR_SENTENCE}" if any(LENGTH_FLOOR in f for f in floors.values()) else "") + \
        (f" {SHUFFLED_SENTENCE}" if any(SHUFFLED_FLOOR in f for f in floors.values()) else "")
    caption = (f"{measure_label(measure)} between the reference language ({doc['reference']}) and each language, "
               f"per hidden layer (0 = embeddings), on n = {doc.get('n')} parallel sentences: one panel per model "
               f"({', '.join(data)}; for the subnetworks each language goes through its own subnetwork); "
               f"controls dashed.{extras}{_iso_note(doc, measure)}")
    return Planned(name, title, caption, ("similarity",), similarity_curves,
                   (doc["layers"], doc["reference"], data),
                   {"measure": measure_label(measure), "colors": colors, "floors": floors or None,
                    "spreads": spreads or None}, _similarity_gaps(doc, measure, floors, spreads))


def _iso_note(doc: Mapping[str, Any], measure: str) -> str:
    method = doc.get("isomorphism_method")
    return f" Isomorphism method: {method}." if measure == "isomorphism" and method else ""


def fig_differences(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.similarity import similarity_differences

    measure = params.measure
    name, title = f"{measure}_differences", f"{measure}: subnetworks minus full model"
    if (m := _absent(study, name, title, "similarity")) is not None:
        return m
    doc = study.docs["similarity"]
    view = sim_view(doc, measure, params.layer)
    if FULL not in view.values or SUBNETWORK not in view.values:
        return Missing(name, title, f"not available: similarity.json lacks {measure} of the full model or the "
                                    "subnetworks")
    diffs = differences(view)
    order = [x for x in colors if x in diffs] + [x for x in diffs if x not in colors]
    intervals = {lang: iv for lang in order if (iv := diffs[lang][1]) is not None}
    floor = floor_differences(view)
    sign = ("Negative: the subnetworks' representations are more isomorphic to the reference's"
            if measure == "isomorphism" else "Positive: the subnetworks are more similar to the reference")
    caption = (f"{measure_label(measure)} with {view.reference} of the subnetworks minus that of the full model, per "
               f"language, {view.where} (parameter layer = {params.layer}). {sign} than the full model's."
               + (f" Thin lines: {_difference_interval_text(view, doc)}." if intervals else "")
               + (" Hollow diamonds (right of each bar): the same difference between the two models' "
                  "length-matched floors, what sentence length alone would give." if floor else "")
               + _iso_note(doc, measure))
    gaps = _similarity_gaps(doc, measure, floor, intervals)
    if intervals and not view.has_paired:
        gaps += (f"similarity.json has no paired intervals of the differences for {measure} (an older version): "
                 "the difference bars carry approximate intervals, the two models' half-widths added in quadrature, "
                 "wider than paired ones.",)
    return Planned(name, title, caption, ("similarity",), similarity_differences,
                   ({lang: diffs[lang][0] for lang in order},),
                   {"reference": view.reference, "measure": measure_label(measure), "where": view.where,
                    "intervals": intervals or None, "floor_differences": floor or None,
                    "interval_label": difference_label(view)},
                   gaps)


def _difference_interval_text(view: SimView, doc: Mapping[str, Any]) -> str:
    """How the intervals of the differences were computed, in words."""
    mean = "; for the mean over layers, the mean of the per-layer bounds" if view.where.startswith("mean") else ""
    if view.has_paired:
        return (f"paired intervals, the {bootstrap_text(doc)} of the difference itself (both models measured on the "
                f"same resamples of the sentences{mean})")
    return ("approximate intervals (the two models' bootstrap half-widths added in quadrature, wider than a paired "
            f"interval{mean})")


def fig_vs_distance(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.similarity import similarity_vs_distance

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
    view = sim_view(sim, measure, params.layer)
    data = {model: per for model, per in view.values.items() if model in (FULL, SUBNETWORK)}
    if not data:
        return Missing(name, title, f"not available: similarity.json has no {measure} of the full model")
    intervals = {model: per for model, per in view.intervals.items() if model in data}
    caption = (f"Syntactic distance to {ref} (URIEL; method: {dist.get('method')}) against {measure_label(measure)} "
               f"with {ref} ({view.where}); Pearson r per model with its {view.confidence:.0%} confidence interval "
               "(Fisher z) and the number of languages n in the legend."
               + (f" Vertical lines: the {bootstrap_text(sim)}." if intervals else ""))
    return Planned(name, title, caption, ("similarity", "language_distance"), similarity_vs_distance,
                   (distance, data), {"reference": ref, "measure": measure_label(measure), "where": view.where,
                                      "method": dist.get("method"), "intervals": intervals or None,
                                      "confidence": view.confidence})


def fig_token_overlap(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> Planned | Missing:
    from stages.figures.similarity import token_overlap_bars

    name, title = "token_overlap", "Token overlap with the reference language"
    if (m := _absent(study, name, title, "token_overlap")) is not None:
        return m
    doc = study.docs["token_overlap"]
    ref = doc["reference"]
    listed = [lang for lang in doc.get("languages") or doc["overlap"] if lang in doc["overlap"] and lang != ref]
    order = [lang for lang in colors if lang in listed] + [lang for lang in listed if lang not in colors]
    overlap = {lang: doc["overlap"][lang] for lang in order}
    caption = (f"Per parallel sentence, |token types of {ref} ∩ token types of the language| / |token types of "
               f"the language| (special tokens excluded), averaged over n = {doc.get('n')} sentences.")
    return Planned(name, title, caption, ("token_overlap",), token_overlap_bars, (overlap,),
                   {"reference": ref, "n": doc.get("n"), "colors": colors})


BUILDERS: tuple[Builder, ...] = (
    fig_perplexity, fig_training_curve, fig_cross_eval, fig_cross_eval_relative, fig_cross_eval_vs_random,
    fig_jaccard, fig_masked_per_layer, fig_trajectories, fig_cka_heatmaps, fig_curves, fig_differences,
    fig_vs_distance, fig_token_overlap,
)


def plan_figures(study: ReportInputs, params: ReportChoice, colors: dict[str, str]) -> list[Planned | Missing]:
    return [build(study, params, colors) for build in BUILDERS]
