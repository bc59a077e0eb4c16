"""The report's generated text: the warnings and "Reading these results".

Every sentence is computed from the inputs' numbers (:mod:`stages.report_reading`), none is written
ahead of the data, so none claims more than they show. A comparison with a control says for how many
languages a trained model beats it and for how many beyond the bootstrap interval, or that no
interval is recorded and what is within noise is unknown; a difference says whether its interval
excludes 0 and which interval it is (paired, or approximate); a correlation gives r with its interval
and n. A warning names a suspicious result with the numbers that triggered it: a control at or above
a trained model's similarity, fine-tuning that made a language worse, truncated encodings, a
subnetwork no better than its size-matched random masks, biased CKA, uncommitted code.

A similarity is a measure or a distance (isomorphism: lower = more alike): every comparison goes
through :func:`_closer` and :func:`_beyond`, which know which. Numbers are given with their interval
where the inputs record one (:func:`fmt_iv`, also used by the key-number tables of
:mod:`stages.report_tables`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from stages.formats.names import BASE, FLOOR_KINDS, FULL, LENGTH_FLOOR, MODEL_LABELS, RANDOM, SHUFFLED_FLOOR, SUBNETWORK
from stages.report_inputs import ReportChoice, ReportInputs
from stages.report_reading import (
    FLOOR_LABELS,
    Interval,
    SimView,
    as_interval,
    cross_eval_matrix,
    difference_label,
    differences,
    floor_differences,
    jaccard_chance,
    measure_label,
    model_intervals,
    random_masks,
    truncations,
)

# --------------------------------------------------------------------------------------------------
# Assessment: warnings (suspicious results, in words) and a reading of the results
# --------------------------------------------------------------------------------------------------


def fmt_num(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def fmt_iv(value: float | None, interval: Interval | None, fmt: str = ".2f") -> str:
    """``"5.65 [5.55, 5.75]"``; the value alone without an interval, ``-`` without a value."""
    text = fmt_num(value, fmt)
    if interval is None or text == "-":
        return text
    return f"{text} [{format(interval[0], fmt)}, {format(interval[1], fmt)}]"


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _closer(a: float, b: float, higher: bool) -> bool:
    """``a`` is more similar than ``b`` (higher, or lower for a distance)."""
    return a > b if higher else a < b


def _beyond(interval: Interval, control: float, control_interval: Interval | None, higher: bool) -> bool:
    """The whole interval lies past the control (past the control's own interval when it has one)."""
    if higher:
        return interval[0] > (control_interval[1] if control_interval else control)
    return interval[1] < (control_interval[0] if control_interval else control)


Control = tuple[str, dict[str, float], dict[str, Interval]]  # label, value per language, interval per language


def controls(view: SimView, trained: str) -> list[Control]:
    """What ``trained``'s similarity should beat: the random-init and base models, and its floors."""
    out: list[Control] = []
    for model in (RANDOM, BASE):
        if model in view.values:
            out.append((f"the {MODEL_LABELS[model]}", view.values[model], view.intervals.get(model, {})))
    for kind in FLOOR_KINDS:
        if view.floors[kind].get(trained):
            out.append((FLOOR_LABELS[kind], view.floors[kind][trained], {}))
    return out


CONSEQUENCES = {
    f"the {MODEL_LABELS[RANDOM]}": "a model that learned nothing is as similar, so this says little about training",
    f"the {MODEL_LABELS[BASE]}": "the model before fine-tuning is as similar",
    FLOOR_LABELS[LENGTH_FLOOR]: "similarity there could come from sentence length alone",
    FLOOR_LABELS[SHUFFLED_FLOOR]: "it is no higher than for unrelated sentences",
}


def _possessive(noun: str) -> str:
    return noun + ("'" if noun.endswith("s") else "'s")


def control_warnings(view: SimView) -> list[str]:
    """A control at or above a trained model's similarity, per (trained model, control)."""
    out = []
    higher = view.higher_is_closer
    for trained in (FULL, SUBNETWORK):
        values = view.values.get(trained) or {}
        for label, control, _ in controls(view, trained):
            hits = [lang for lang in values if _finite(values[lang], control.get(lang))
                    and not _closer(values[lang], control[lang], higher)]
            if not hits:
                continue
            cmp = "≥" if higher else "≤"
            detail = ", ".join(f"{lang} ({control[lang]:.3f} {cmp} {values[lang]:.3f})" for lang in hits)
            out.append(f"Control at or above a trained model: {label} is at least as {'high' if higher else 'low'} as "
                       f"the {_possessive(MODEL_LABELS[trained])} {measure_label(view.measure)} with {view.reference} "
                       f"({view.where}) for {detail}; {CONSEQUENCES.get(label, 'check it')}.")
    return out


def _perplexities(doc: Mapping[str, Any], when: str) -> dict[str, float]:
    return {lang: float(e["perplexity"]) for lang, e in (doc.get(when) or {}).items()
            if isinstance(e, Mapping) and _finite(e.get("perplexity"))}


def finetune_warnings(study: ReportInputs) -> list[str]:
    """Languages whose perplexity rose with fine-tuning beyond the intervals (or with none recorded)."""
    doc = study.docs.get("model")
    if not doc:
        return []
    before, after = _perplexities(doc, "before"), _perplexities(doc, "after")
    iv_b, iv_a = model_intervals(doc, "before"), model_intervals(doc, "after")
    out = []
    for lang in (x for x in before if x in after and after[x] > before[x]):
        ib, ia = iv_b.get(lang), iv_a.get(lang)
        if ib and ia and ia[0] <= ib[1]:
            continue  # within noise: said in the reading
        why = "the intervals do not overlap" if ib and ia else "no interval recorded, so this may be noise"
        out.append(f"Fine-tuning made {lang} worse: perplexity {fmt_iv(before[lang], ib)} before, "
                   f"{fmt_iv(after[lang], ia)} after ({why}).")
    return out


def truncation_warnings(study: ReportInputs) -> list[str]:
    """Sentences that encode cut at its length limit, per language (see :func:`truncations`)."""
    out = []
    for lang, k, max_len, n, names in truncations(study.docs.get("similarity") or {}):
        of = f"{k} of {n}" if n else str(k)
        at = f"at {max_len} tokens" if max_len else "at the encoder's maximum length"
        out.append(f"Truncated encodings: {of} sentences of {lang} were cut {at} (in the encodings of "
                   f"{', '.join(names)}): their pairs are not fully parallel, since the cut tokens are missing on "
                   f"the {lang} side.")
    return out


OwnVsRandom = tuple[str, float, float, float | None, int]  # language, own ppl, random mean, random sd, seeds


def own_vs_random(doc: Mapping[str, Any] | None) -> list[OwnVsRandom]:
    """Each subnetwork on its own language against its size-matched random masks (same language)."""
    rnd = random_masks(doc) if doc else None
    if doc is None or rnd is None:
        return []
    rows, cols, ppl = cross_eval_matrix(doc)
    out: list[OwnVsRandom] = []
    for i, lang in enumerate(rnd.rows):
        if lang not in rows or lang not in cols or lang not in rnd.cols:
            continue
        j = rnd.cols.index(lang)
        own, mean = ppl[rows.index(lang)][cols.index(lang)], rnd.mean[i][j]
        sd = rnd.std[i][j] if rnd.std else None
        if _finite(own, mean):
            out.append((lang, float(own), float(mean), sd if _finite(sd) else None, rnd.seeds))
    return out


def random_warnings(study: ReportInputs) -> list[str]:
    return [f"The {lang} subnetwork is no better than its size-matched random masks on {lang}: perplexity "
            f"{own:.2f} vs {mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")
            + f" (mean{' ± sd' if sd is not None else ''} over {seeds} seeds)."
            for lang, own, mean, sd, seeds in own_vs_random(study.docs.get("cross_eval")) if own >= mean]


def measure_warnings(params: ReportChoice, view: SimView | None) -> list[str]:
    if view is None or params.measure != "cka":
        return []
    floor = [v for v in (view.floors[SHUFFLED_FLOOR].get(FULL) or {}).values() if _finite(v)]
    value = (f"its shuffled-row floor here is {sum(floor) / len(floor):.2f}" if floor else
             "about 0.43 with shuffled rows for 1,000 sentences of 768 dimensions")
    return [f"The similarity figures use biased linear CKA (measure: cka), which is far above 0 even for unrelated "
            f"representations ({value}); set the report's measure to cka_debiased."]


def code_warnings(provenance: Mapping[str, Any]) -> list[str]:
    out = []
    commit = str((provenance.get("code") or {}).get("git_commit") or "")
    if "dirty" in commit:
        out.append(f"The code that ran this report had uncommitted changes (git commit {commit}): no commit "
                   "reproduces it exactly.")
    dirty = [str(u.get("job_label") or u.get("ref")) for u in provenance.get("upstream") or []
             if "dirty" in str(u.get("git_commit") or "")]
    if dirty:
        out.append(f"Upstream jobs ran with uncommitted changes: {', '.join(dirty)}.")
    return out


def warnings_of(study: ReportInputs, params: ReportChoice, view: SimView | None) -> list[str]:
    """Every suspicious result, in words."""
    return [*(control_warnings(view) if view else []), *finetune_warnings(study), *truncation_warnings(study),
            *random_warnings(study), *measure_warnings(params, view), *code_warnings(study.provenance)]


def control_reading(view: SimView) -> list[str]:
    """Per trained model and control: for how many languages the model beats it, how many clearly."""
    lines = []
    higher = view.higher_is_closer
    for trained in (FULL, SUBNETWORK):
        values, ivs = view.values.get(trained) or {}, view.intervals.get(trained, {})
        for label, control, c_ivs in controls(view, trained):
            langs = [lang for lang in values if _finite(values[lang], control.get(lang))]
            if not langs:
                continue
            beaten = [lang for lang in langs if _closer(values[lang], control[lang], higher)]
            missed = [lang for lang in langs if lang not in beaten]
            text = (f"{MODEL_LABELS[trained].capitalize()}: {measure_label(view.measure)} with {view.reference} "
                    f"({view.where}) {'above' if higher else 'below'} {label} for {len(beaten)} of {len(langs)} "
                    "languages" + (f" (not: {', '.join(missed)})" if missed else ""))
            lines.append(text + _noise_text(beaten, ivs, control, c_ivs, view) + ".")
    return lines


def _noise_text(beaten: Sequence[str], ivs: Mapping[str, Interval], control: Mapping[str, float],
                c_ivs: Mapping[str, Interval], view: SimView) -> str:
    if not ivs:
        return "; no intervals recorded, so what is within noise is unknown"
    clear = [x for x in beaten if x in ivs and _beyond(ivs[x], control[x], c_ivs.get(x), view.higher_is_closer)]
    noise = [x for x in beaten if x not in clear]
    return (f"; {len(clear)} beyond the {view.confidence:.0%} bootstrap interval"
            + (f", within noise: {', '.join(noise)}" if noise else ""))


def difference_reading(view: SimView) -> list[str]:
    diffs = differences(view)
    if not diffs:
        return []
    higher = view.higher_is_closer
    closer = [lang for lang, (d, _) in diffs.items() if _closer(d, 0.0, higher)]
    text = (f"Subnetworks minus full model ({measure_label(view.measure)} with {view.reference}, {view.where}): "
            f"the subnetworks are closer to {view.reference} for {len(closer)} of {len(diffs)} languages")
    with_iv = {lang: iv for lang, (_, iv) in diffs.items() if iv is not None}
    if with_iv:
        clear = [lang for lang, iv in with_iv.items() if iv[0] > 0 or iv[1] < 0]
        text += (f"; the {difference_label(view)} excludes 0 for {len(clear)}" + (f" ({', '.join(clear)})" if clear else "")
                 + ("; the rest are within noise" if len(clear) < len(with_iv) else ""))
    floor = floor_differences(view)
    if floor:
        larger = [lang for lang in diffs if lang in floor and abs(diffs[lang][0]) > abs(floor[lang])]
        text += f"; larger than the same difference between the length-matched floors for {len(larger)} of {len(floor)}"
    return [text + "."]


def finetune_reading(study: ReportInputs) -> list[str]:
    doc = study.docs.get("model")
    if not doc:
        return []
    before, after = _perplexities(doc, "before"), _perplexities(doc, "after")
    langs = [x for x in before if x in after]
    if not langs:
        return []
    iv_b, iv_a = model_intervals(doc, "before"), model_intervals(doc, "after")
    known = [x for x in langs if x in iv_b and x in iv_a]
    apart = {x for x in known if iv_a[x][1] < iv_b[x][0] or iv_a[x][0] > iv_b[x][1]}

    def detail(group: Sequence[str]) -> str:
        if not known:
            return ""
        noise = [x for x in group if x in known and x not in apart]
        return (f" (the before and after intervals apart for {sum(x in apart for x in group)}"
                + (f"; within noise: {', '.join(noise)}" if noise else "") + ")")

    lower = [x for x in langs if after[x] < before[x]]
    raised = [x for x in langs if after[x] > before[x]]
    text = f"Fine-tuning lowered perplexity for {len(lower)} of {len(langs)} languages{detail(lower)}"
    text += f"; it rose for {', '.join(raised)}{detail(raised)}" if raised else ""
    return [text + ("" if known else "; no intervals recorded") + "."]


def random_reading(study: ReportInputs) -> list[str]:
    rows = own_vs_random(study.docs.get("cross_eval"))
    if not rows:
        return []
    better = [lang for lang, own, mean, _, _ in rows if own < mean]
    clear = [lang for lang, own, mean, sd, _ in rows if sd is not None and own < mean - 2 * sd]
    missed = [lang for lang, *_ in rows if lang not in better]
    return [f"On its own language, the subnetwork beats its size-matched random masks (mean over {rows[0][4]} seeds) "
            f"for {len(better)} of {len(rows)} languages" + (f" (not: {', '.join(missed)})" if missed else "")
            + f"; by more than two standard deviations of the random masks for {len(clear)}."]


def chance_pairs(stats: Mapping[str, Any]) -> list[tuple[float, float, Interval | None]]:
    """(observed, chance, chance interval) Jaccard for every language pair of mask_stats.json."""
    chance = jaccard_chance(stats)
    if chance is None or not stats.get("jaccard"):
        return []
    mean, interval = chance
    matrix = stats["jaccard"]["matrix"]
    n = len(matrix)
    return [(matrix[i][j], mean[i][j], as_interval(interval[i][j]) if interval else None)
            for i in range(n) for j in range(i + 1, n) if _finite(matrix[i][j], mean[i][j])]


def jaccard_reading(study: ReportInputs) -> list[str]:
    pairs = chance_pairs(study.docs.get("mask_stats") or {})
    if not pairs:
        return []
    observed = sum(p[0] for p in pairs) / len(pairs)
    chance = sum(p[1] for p in pairs) / len(pairs)
    text = (f"Kept heads overlap by a mean Jaccard of {observed:.3f} over language pairs; random masks of the same "
            f"sizes would give {chance:.3f} (chance)")
    with_iv = [(o, iv) for o, _, iv in pairs if iv is not None]
    if with_iv:
        above = sum(o > iv[1] for o, iv in with_iv)
        below = sum(o < iv[0] for o, iv in with_iv)
        text += (f": {above} of {len(with_iv)} pairs above their chance interval, {below} below, "
                 f"{len(with_iv) - above - below} within it")
    return [text + "."]


def distance_pairs(study: ReportInputs, view: SimView) -> tuple[list[float], list[float]]:
    """Syntactic distance to the reference and the full model's similarity, per language with both."""
    dist = study.docs.get("language_distance") or {}
    dlangs = list(dist.get("languages") or [])
    full = view.values.get(FULL) or {}
    if view.reference not in dlangs:
        return [], []
    row = dist["syntactic"][dlangs.index(view.reference)]
    langs = [x for i, x in enumerate(dlangs) if x in full and _finite(row[i], full[x])]
    return [float(row[dlangs.index(x)]) for x in langs], [full[x] for x in langs]


def correlation_reading(study: ReportInputs, view: SimView) -> list[str]:
    from stages import figures as F

    x, y = distance_pairs(study, view)
    if not x:
        return []
    r = F.pearson_r(x, y)
    ci = F.pearson_ci(r, len(x), view.confidence)
    verdict = ("" if ci is None else "; the interval includes 0: no evidence of a relation at this n"
               if ci[0] <= 0 <= ci[1] else "; the interval excludes 0")
    return [f"Syntactic distance to {view.reference} against the full model's {measure_label(view.measure)} "
            f"({view.where}): Pearson {F.format_r(r, len(x), view.confidence)} languages{verdict}."]


def reading_lines(study: ReportInputs, view: SimView | None) -> list[str]:
    """What the numbers say, generated from the data: which controls the models beat, what is within noise."""
    lines = [*(control_reading(view) + difference_reading(view) if view else []), *finetune_reading(study),
             *random_reading(study), *jaccard_reading(study),
             *(correlation_reading(study, view) if view else [])]
    return lines or ["The inputs hold no numbers to compare with controls."]
