"""Stage ``report``: the study's figures (PNG + PDF) and one report page, drawn from artifacts by lineage.

Every input is optional; a figure whose data are missing is skipped and listed on the page as
"not available" with the reason. An input written by an older version of its stage, without one of
the extras below, is drawn without it, and the page says what it could not show ("Not shown").
The figures (see :mod:`stages.figures`, one pure function each):

=================================  ==============================  =====================================
file (``.png`` + ``.pdf``)          inputs                          what it shows
=================================  ==============================  =====================================
``perplexity_before_after``        ``model`` (metrics.json)         eval perplexity per language, before
                                                                    and after MLM fine-tuning, intervals
``training_curve``                 ``model``                        eval perplexity per evaluation step
``cross_eval_perplexity``          ``cross_eval``                   rows = subnetwork (+ full model, +
                                                                    size-matched random masks, mean and
                                                                    sd over seeds), columns = eval
                                                                    language
``cross_eval_relative``            ``cross_eval``                   the same / the full model's row
``cross_eval_vs_random``           ``cross_eval`` (``random``)      each subnetwork / its size-matched
                                                                    random masks (mean over seeds)
``jaccard_kept_heads``             ``mask_stats``                   Jaccard of kept heads, per pair, and
                                                                    minus chance (``jaccard_chance``)
``masked_per_layer``               ``mask_stats``                   proportion of heads masked per
                                                                    layer: mean over languages + each
``pruning_trajectories``           ``masks`` (trajectory.json)      heads kept vs perplexity, threshold
``cka_layer_by_layer``             ``similarity`` (layer_by_layer,  CKA full-model layer x subnetwork
                                   ``layer_by_layer_debiased``)     layer, per language: debiased unless
                                                                    ``measure`` is ``cka``
``<measure>_curves``               ``similarity``                   reference vs each language per
                                                                    layer; full, subnetworks, controls;
                                                                    floors and bootstrap bands
``<measure>_differences``          ``similarity``                   subnetworks - full model, per
                                                                    language (``layer`` or layer mean),
                                                                    paired interval (``spread_difference``;
                                                                    else approximate), floor difference
``<measure>_vs_syntactic_distance`` ``similarity``,                 similarity vs URIEL syntactic
                                   ``language_distance``            distance, Pearson r, its CI and n
``token_overlap``                  ``token_overlap``                token overlap with the reference
=================================  ==============================  =====================================

Extras read when present, and how a missing one shows: :mod:`stages.report_reading`.

The page (``report.html``, self-contained: relative ``<img>`` links, inline CSS; and ``report.md``):
parameters; **Warnings** (suspicious results in words: a control at or above a trained model's
similarity, fine-tuning that made a language worse, truncated encodings, a subnetwork no better than
its size-matched random masks, biased CKA, uncommitted code); **Reading these results** (generated:
which controls the models beat, what is within noise); the spec's ``notes`` under ``notes_title``;
key numbers with their intervals; the figures, each with its caption, the test split its numbers
come from, its source artifact versions and upstream jobs; what is not shown or not available;
**Provenance** (spec path and hash, git commit and dirty state, Python and package versions, every
upstream job with its parameters, seed and artifact version); the inputs' lineage.

``figures.json``: figure -> files, title, caption, source artifact versions, upstream jobs
(the transitive closure of the sources over the provenance's ``inputs``); the figures not available
and why; what is not shown; the warnings and the reading; the provenance; the parameters. Files are
deterministic: the same inputs give byte-identical files with the same matplotlib version (no dates,
no software versions in PNG/PDF metadata, no timestamps on the page).

matplotlib is imported only while the stage runs (the engine imports this module to plan studies).

The stage is assembled from pure modules, one room per concern: :mod:`stages.report_inputs` (the
inputs read once), :mod:`stages.report_reading` (what is read of them: key names, extras, matrices),
:mod:`stages.report_plan` (what each figure draws, or why it cannot), :mod:`stages.report_text`
(warnings, the reading), :mod:`stages.report_tables` (key-number tables),
:mod:`stages.report_provenance` (where each number comes from), :mod:`stages.report_page` (the
page's blocks, rendered as Markdown and HTML) and :mod:`stages.figures` (the drawing). This module
holds the parameters, the assembly of the page and figures.json, and the stage: only it touches the
context and writes files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageParams, stage
from stages._io import write_json
from stages.formats.names import MEASURES
from stages.report_inputs import INPUT_ORDER, ReportInputs, load_report_inputs
from stages.report_page import Block, Bullets, Drawn, Heading, Notes, Para, Table, render_html, render_markdown, sentence
from stages.report_plan import Missing, Planned, plan_figures
from stages.report_provenance import lineage_rows, provenance_blocks, source_records, upstream_closure
from stages.report_reading import bootstrap_text, difference_label, measure_label, sim_view
from stages.report_tables import language_rows, similarity_rows, summary_lines
from stages.report_text import reading_lines, warnings_of


class ReportParams(StageParams):
    """Parameters of the ``report`` stage."""

    measure: str = Field(
        "cka_debiased", min_length=1,
        description="Similarity measure of similarity.json drawn as curves, differences and against syntactic "
        f"distance ({', '.join(MEASURES)}). Biased cka is far above 0 for unrelated representations; the "
        "report flags it.",
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
    notes: str | None = Field(
        None,
        description="Study-specific caveats, as Markdown (paragraphs, '- ' lists, `code`, **bold**, *italics*): "
        "shown under notes_title after the generated 'Reading these results'.",
    )
    notes_title: str = Field(
        "What these results show and do not show", min_length=1,
        description="Heading of the notes section (shown only when notes are given).",
    )


def check_params(study: ReportInputs, params: ReportParams) -> None:
    """The measure and layer must exist in similarity.json (when it is an input)."""
    doc = study.docs.get("similarity")
    if doc is None:
        return
    available = sorted({m for per_model in doc.get("pairwise", {}).values() for m in per_model})
    if params.measure not in available:
        raise ValueError(f"measure {params.measure!r} is not in similarity.json; it has: {', '.join(available)}. "
                         "Set the report's measure to one of them, or recompute similarity with "
                         f"{params.measure} in its measures")
    layers = list(doc.get("layers") or [])
    if params.layer is not None and params.layer not in layers:
        raise ValueError(f"layer {params.layer} is not in similarity.json; its layers: {layers}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    return Table(tuple(header), tuple(tuple(r) for r in rows))


@dataclass
class PageData:
    """Everything the page shows."""

    params: ReportParams
    warnings: list[str]
    reading: list[str]
    summary: list[str]
    tables: list[tuple[str, Table]]
    drawn: list[Drawn]
    gaps: list[str]
    missing: list[Missing]
    provenance: Mapping[str, Any]
    lineage: list[list[str]]


def page_blocks(data: PageData) -> list[Block]:
    p = data.params
    shown = {k: v for k, v in p.model_dump(mode="json").items() if k not in ("notes", "notes_title", "title")}
    blocks: list[Block] = [Heading(p.title, 1), Para("Parameters: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()))]
    blocks += [Heading("Warnings"), Bullets(tuple(data.warnings)) if data.warnings else
               Para("None: no control reaches a trained model, no language got worse with fine-tuning, no subnetwork "
                    "is beaten by its random masks, no truncation is recorded.")]
    blocks += [Heading("Reading these results"), Bullets(tuple(data.reading))]
    if p.notes:
        blocks += [Heading(p.notes_title), Notes(p.notes)]
    blocks += [Heading("Key numbers"), Bullets(tuple(data.summary))]
    for intro, table in data.tables:
        blocks += [Para(intro), table]
    blocks += [Heading("Figures"), *data.drawn]
    if data.gaps:
        blocks += [Heading("Not shown"), Para("Inputs written by older versions of their stages lack these:"),
                   Bullets(tuple(data.gaps))]
    if data.missing:
        blocks += [Heading("Not available"), Bullets(tuple(f"`{m.name}` ({m.title}): {m.reason}" for m in data.missing))]
    blocks += provenance_blocks(data.provenance)
    blocks += [Heading("Inputs (lineage)"),
               _table(["input", "artifact version", "type", "producing job", "matrix point"], data.lineage)]
    return blocks


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
    version="3",  # 3: paired intervals of the differences, truncation from encodings, debiased layer x layer
)
def report_stage(params: ReportParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """The study's figures (PNG + PDF) and a report page (HTML + Markdown) with each figure's lineage."""
    from stages import figures as F

    study = load_report_inputs(inputs, getattr(ctx, "provenance", None))
    if not study.sources:
        raise ValueError("report: no input is connected; connect at least one of " + ", ".join(INPUT_ORDER))
    check_params(study, params)
    colors = F.language_colors(study.languages())
    plans = plan_figures(study, params, colors)
    out = ctx.output_dir("figures")
    drawn: list[Drawn] = []
    with F.style():
        for plan in plans:
            if isinstance(plan, Planned):
                fig = plan.fn(*plan.args, **plan.kwargs)
                records = source_records(study, plan.sources)
                drawn.append(Drawn(plan, F.save(fig, out, plan.name), records,
                                   upstream_closure(study.provenance, [r["ref"] for r in records])))
    data = page_data(study, params, drawn, [p for p in plans if isinstance(p, Missing)])
    blocks = page_blocks(data)
    write_json(out / "figures.json", figures_index(data, study))
    (out / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(render_html(blocks), encoding="utf-8")
    return {"figures": {
        "figures": [d.plan.name for d in drawn],
        "not_available": {m.name: m.reason for m in data.missing},
        "measure": params.measure,
        "layer": params.layer,
        "warnings": data.warnings,
    }}


def page_data(study: ReportInputs, params: ReportParams, drawn: list[Drawn], missing: list[Missing]) -> PageData:
    sim = study.docs.get("similarity")
    view = sim_view(sim, params.measure, params.layer) if sim else None
    tables = [("Per language (brackets: intervals where the inputs record them):", _table(*language_rows(study)))]
    if view is not None:
        intro = (f"{measure_label(view.measure)} with {view.reference}, {view.where}; brackets: the "
                 f"{bootstrap_text(sim or {})}; last column: subnetworks minus full model, {difference_label(view)}"
                 + ("." if view.has_paired else " (half-widths in quadrature)."))
        tables.append((intro, _table(*similarity_rows(view, study.languages()))))
    gaps = list(dict.fromkeys(g for d in drawn for g in d.plan.gaps))
    return PageData(params, warnings_of(study, params, view), reading_lines(study, view), summary_lines(study),
                    tables, drawn, gaps, missing, study.provenance, lineage_rows(study))


def figures_index(data: PageData, study: ReportInputs) -> dict[str, Any]:
    """figures.json: every figure's files, title, caption, sources and upstream jobs; the rest of the page's
    findings; the provenance."""
    return {
        "figures": {d.plan.name: {"files": d.files, "title": d.plan.title, "caption": sentence(d.plan.caption),
                                  "not_shown": list(d.plan.gaps), "sources": d.records, "upstream": d.upstream}
                    for d in data.drawn},
        "not_available": {m.name: m.reason for m in data.missing},
        "not_shown": data.gaps,
        "warnings": data.warnings,
        "reading": data.reading,
        "inputs": source_records(study, INPUT_ORDER),
        "params": data.params.model_dump(mode="json"),
        "provenance": dict(data.provenance),
        "pages": ["report.html", "report.md"],
    }


REPORT: StageDef = report_stage
