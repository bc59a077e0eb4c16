"""The report's key-number tables: per language, and per language at the report's measure and layer.

Each value comes with its interval where the inputs record one (:func:`stages.report_text.fmt_iv`):
perplexity before and after fine-tuning, heads kept, the subnetwork's own-language perplexity, relative
to the full model and to its size-matched random masks; the similarity with the reference for every
model, the floors, and the subnetworks-minus-full difference. The prose around them (warnings, the
reading) is :mod:`stages.report_text`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stages.formats.names import BASE, FLOOR_KINDS, FULL, LENGTH_FLOOR, MODEL_LABELS, RANDOM, SUBNETWORK
from stages.report_inputs import ReportInputs
from stages.report_reading import (
    FLOOR_LABELS,
    Interval,
    SimView,
    as_interval,
    cross_eval_matrix,
    differences,
    heads_kept_table,
    model_interval,
    ratio,
    relative_matrix,
)
from stages.report_text import chance_pairs, fmt_iv, fmt_num, own_vs_random


def _cross_eval_cells(doc: Mapping[str, Any] | None) -> dict[str, tuple[float | None, Interval | None, float | None]]:
    """Per language: the own-language perplexity of its subnetwork, its interval, and relative to full."""
    if not doc:
        return {}
    rows, cols, ppl = cross_eval_matrix(doc)
    _, _, rel = relative_matrix(doc)
    ivs = cross_eval_matrix(doc, "perplexity_interval")[2] if doc.get("perplexity_interval") else None
    return {lang: (ppl[i][cols.index(lang)], as_interval(ivs[i][cols.index(lang)]) if ivs else None,
                   rel[i][cols.index(lang)]) for i, lang in enumerate(rows) if lang in cols}


def language_rows(study: ReportInputs) -> tuple[list[str], list[list[str]]]:
    """Per language: perplexity before/after fine-tuning, heads kept, own-language perplexity of the
    subnetwork, relative to the full model and to its size-matched random masks."""
    model = study.docs.get("model") or {}
    before, after = model.get("before") or {}, model.get("after") or {}
    heads = heads_kept_table(study)
    own = _cross_eval_cells(study.docs.get("cross_eval"))
    rnd = {lang: (mean, sd, seeds) for lang, _, mean, sd, seeds in own_vs_random(study.docs.get("cross_eval"))}
    header = ["language", "perplexity before", "perplexity after", "heads kept", "own-language perplexity",
              "own-language ppl / full", "size-matched random masks", "own / random"]
    rows = []
    for lang in study.languages():
        kept = heads.get(lang)
        ppl, iv, rel = own.get(lang, (None, None, None))
        r = rnd.get(lang)
        rows.append([
            lang,
            fmt_iv((before.get(lang) or {}).get("perplexity"), model_interval(before.get(lang) or {})),
            fmt_iv((after.get(lang) or {}).get("perplexity"), model_interval(after.get(lang) or {})),
            f"{kept[0]}/{kept[1]}" if kept else "-",
            fmt_iv(ppl, iv),
            fmt_num(rel, ".3f"),
            (f"{r[0]:.2f}" + (f" ± {r[1]:.2f}" if r[1] is not None else "") + f" ({r[2]} seeds)") if r else "-",
            fmt_num(ratio(ppl, r[0]) if r else None, ".3f"),
        ])
    return header, rows


FLOOR_OWNERS = {FULL: "full model", RANDOM: "random-init model"}


def similarity_rows(view: SimView, order: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Per language: the measure with the reference for every model, the full model's floors, the
    random-init model's length-matched floor (how much of its similarity is sentence length) and the
    subnetworks-minus-full difference, each with its interval where known."""
    models = [m for m in (FULL, SUBNETWORK, BASE, RANDOM) if m in view.values]
    wanted = [(k, FULL) for k in FLOOR_KINDS] + [(LENGTH_FLOOR, RANDOM)]
    floors = [(k, m) for k, m in wanted if view.floors[k].get(m)]
    diffs = differences(view)
    header = (["language"] + [MODEL_LABELS[m] for m in models]
              + [f"{FLOOR_LABELS[k].removeprefix('the ')} ({FLOOR_OWNERS[m]})" for k, m in floors]
              + (["subnetworks − full"] if diffs else []))
    langs = [x for x in order if any(x in view.values[m] for m in models)]
    rows = []
    for lang in langs:
        row = [lang] + [fmt_iv(view.values[m].get(lang), view.intervals.get(m, {}).get(lang), ".3f") for m in models]
        row += [fmt_num(view.floors[k][m].get(lang), ".3f") for k, m in floors]
        if diffs:
            d, iv = diffs.get(lang, (None, None))
            row.append(fmt_iv(d, iv, "+.3f"))
        rows.append(row)
    return header, rows


def summary_lines(study: ReportInputs) -> list[str]:
    lines = []
    model = study.docs.get("model")
    if model and model.get("mean_loss_before") is not None:
        lines.append(f"Mean eval loss over languages: {fmt_num(model['mean_loss_before'], '.4f')} before, "
                     f"{fmt_num(model.get('mean_loss_after'), '.4f')} after fine-tuning (step {model.get('best_step')}).")
    stats = study.docs.get("mask_stats")
    if stats and stats.get("jaccard_mean") is not None:
        lines.append(f"Jaccard of kept heads: mean {fmt_num(stats['jaccard_mean'], '.3f')} (min "
                     f"{fmt_num(stats.get('jaccard_min'), '.3f')}, max {fmt_num(stats.get('jaccard_max'), '.3f')})"
                     f"{_chance_text(stats)}.")
    if stats and stats.get("heads_kept_by_all") is not None:
        lines.append(f"Heads kept by every language: {stats['heads_kept_by_all']} of {stats.get('total_heads')}; "
                     f"by at least one: {stats.get('heads_kept_by_any')}.")
    return lines


def _chance_text(stats: Mapping[str, Any]) -> str:
    """``"; chance 0.500 [0.400, 0.600] ..."``: the chance Jaccard and its interval, means over pairs."""
    pairs = chance_pairs(stats)
    if not pairs:
        return ""
    mean = sum(p[1] for p in pairs) / len(pairs)
    ivs = [p[2] for p in pairs if p[2] is not None]
    iv = (sum(i[0] for i in ivs) / len(ivs), sum(i[1] for i in ivs) / len(ivs)) if ivs else None
    return f"; chance {fmt_iv(mean, iv, '.3f')} (random masks of the same sizes, mean over pairs)"
