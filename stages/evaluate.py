"""Stage ``cross_eval``: how language-specific are the pruned subnetworks?

For every subnetwork language ``s`` (one ``head-mask`` per language) and every eval language ``t``, the
deterministic-mask perplexity (:mod:`stages.mlm`) of the model gated with mask ``s``
(:class:`stages.gating.HeadGates`) on the **reporting half** of ``t``'s test documents
(``split="report"``: the masks were chosen on the selection half, ``stages.dataset``), plus the ungated
full model as the last row ``"full"``. **Rows are subnetworks, columns are eval languages** (the original
swapped the labels of its heatmap); the JSON names both axes. Every cell carries a percentile-bootstrap
interval over the eval chunks (:func:`stages.perplexity.bootstrap_perplexity_interval`, resamples seeded by
``(eval_seed, column language)``, so paired across rows).

**No forward pass twice**: the model is loaded once and every column's batches are masked once per job;
identical masks are evaluated once (memoised by their values), and a mask keeping every head is the
ungated model (gates of 1 multiply by 1.0: bit-identical), evaluated without hooks. The ``"full"`` row
is the one ``train`` already measured ("after", the reporting half; "select_after", the selection half)
when the model input is train's output measured on the same dataset version, chunks, masks, batches,
interval settings and in float32 (:mod:`stages.eval_reuse`, decided by lineage: train's recorded
parameters and inputs); otherwise it is computed. ``full_model_row`` says which, and why.

**Size-matched random masks** (:mod:`stages.random_masks`): for each language's mask and each of
``random_mask_seeds`` seeds, a mask keeping exactly the same number of heads in every layer, uniformly at
random, evaluated on every column; ``relative_to_random`` = perplexity of the language's own mask / mean
perplexity of its random masks. Identical masks are evaluated once (memoised).

The masks are read by :mod:`stages.formats.masks`, the model and its batches prepared by
:mod:`stages.eval_model` (shared with ``prune``). The statistics of the masks themselves (heads per
layer, Jaccard of kept heads) are stage ``mask_stats`` (:mod:`stages.mask_stats`).

Output ``metrics`` (type ``metrics``)::

    cross_eval.json  {"row_axis": "subnetwork", "col_axis": "eval_language", "rows": [..., "full"],
                      "cols": [...], "perplexity": [[...]], "loss": [[...]],
                      "perplexity_interval": [[[lo, hi] per col] per row],
                      "relative_perplexity": [[ppl / ppl of the full model on that column]],
                      "tokens": {lang: masked tokens}, "heads_kept": {row: n}, "eval_seed",
                      "eval_split": "report", "interval": {"method", "level", "resamples"},
                      "random": {"seeds", "rows" (mask languages), "cols",
                                 "perplexity_by_seed": [[[per col] per seed] per row],
                                 "perplexity_mean", "perplexity_std" (ddof 1; null for one seed),
                                 "perplexity_min", "perplexity_max": [[per col] per row],
                                 "relative_to_random": [[own ppl / mean random ppl]],
                                 "heads_kept_per_layer": {lang: [per layer]}, "method"}
                      (no "random" key when random_mask_seeds is 0),
                      "full_model_row": {"source": "train" | "computed", "model": ref, "reason"}, ...}
    cross_eval.csv   header "subnetwork,<lang>,...", one row per subnetwork (perplexity)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from orchestrator.stage import Input, Inputs, StageContext, StageDef, stage
from stages._io import effective_seed, get_input, write_json
from stages.eval_model import eval_batches_for, eval_tokenizer, load_eval_model
from stages.eval_reuse import SETTINGS, recorded_full_model
from stages.formats.dataset import dataset_languages
from stages.formats.masks import mask_inputs
from stages.formats.metrics import CROSS_EVAL_CSV, CROSS_EVAL_JSON, json_matrix, matrix_csv
from stages.formats.names import FULL
from stages.mlm import EvalParams
from stages.random_masks import random_mask_seeds, random_rows, random_section

# --------------------------------------------------------------------------------------------------
# cross_eval: the matrix, given a perplexity function
# --------------------------------------------------------------------------------------------------


def cross_matrix(
    rows: Sequence[tuple[str, np.ndarray | None]],
    cols: Sequence[str],
    eval_fn: Callable[[np.ndarray | None, str], Mapping[str, float]],
    keys: Sequence[str] = ("loss", "perplexity"),
) -> dict[str, np.ndarray]:
    """One matrix [rows, cols] per key of ``keys`` (default ``loss``, ``perplexity``):
    ``eval_fn(mask or None, eval_language)[key]`` (None = the ungated model) for every row mask and
    column language."""
    out = {key: np.full((len(rows), len(cols)), np.nan) for key in keys}
    for i, (_, mask) in enumerate(rows):
        for j, lang in enumerate(cols):
            res = eval_fn(mask, lang)
            for key in keys:
                out[key][i, j] = float(res[key])
    return out


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------


class CrossEvalParams(EvalParams):
    """Parameters of the ``cross_eval`` stage."""

    split: Literal["select", "report"] = Field(
        "report",
        description="Half of the test documents to evaluate on: 'report' (default: the masks were chosen on 'select').",
    )
    languages: list[str] | None = Field(None, description="Eval languages (columns); None: every language of the dataset.")
    random_mask_seeds: int = Field(
        5, ge=0, description="Size-matched random masks per language mask (0: none); each is evaluated on every column."
    )
    seed: int | None = Field(None, description="Seed of the random masks; None: the job's seed.")


def mask_key(mask: np.ndarray | None) -> bytes | None:
    """What identifies a row's computation: the mask's float32 values; None for the ungated model and for
    a mask keeping every head (gating by 1.0 multiplies by one: the same numbers, bit for bit)."""
    if mask is None:
        return None
    arr = np.asarray(mask, dtype=np.float32)
    return None if bool(np.all(arr == 1.0)) else arr.tobytes()


class _CellEvaluator:
    """Evaluates one (mask, eval language) cell of ``cross_eval`` and memoises it by :func:`mask_key`,
    so that identical masks run once and an all-ones mask is the ungated model; ``known`` prefills
    the ungated model's cells (train's numbers, :mod:`stages.eval_reuse`)."""

    def __init__(
        self,
        model: Any,
        batches: Mapping[str, list[dict[str, Any]]],
        params: CrossEvalParams,
        on_cell: Callable[[], None],
        known: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self.model = model
        self.batches = batches
        self.params = params
        self.on_cell = on_cell
        self.tokens: dict[str, int] = {lang: int(cell["tokens"]) for lang, cell in (known or {}).items()}
        self._memo: dict[tuple[bytes | None, str], dict[str, float]] = {
            (None, lang): dict(cell) for lang, cell in (known or {}).items()
        }
        self.forward_cells = 0  # cells evaluated with forward passes (the rest were memoised or known)

    def __call__(self, mask: np.ndarray | None, lang: str) -> Mapping[str, float]:
        key = (mask_key(mask), lang)
        if key not in self._memo:
            self._memo[key] = self._evaluate(None if key[0] is None else mask, lang)
            self.forward_cells += 1
        self.on_cell()
        return self._memo[key]

    def _evaluate(self, mask: np.ndarray | None, lang: str) -> dict[str, float]:
        from stages.gating import HeadGates
        from stages.mlm import bootstrap_seed, evaluate_chunks

        if mask is None:
            chunks = evaluate_chunks(self.model, self.batches[lang])  # the full model: no hooks at all
        else:
            with HeadGates(self.model, mask):
                chunks = evaluate_chunks(self.model, self.batches[lang])
        p = self.params
        lo, hi = chunks.perplexity_interval(bootstrap_seed(p.eval_seed, lang), p.bootstrap_resamples, p.interval_level)
        summary = chunks.summary()
        self.tokens[lang] = int(summary["tokens"])
        return {**summary, "perplexity_lo": lo, "perplexity_hi": hi}


@stage(
    "cross_eval",
    params=CrossEvalParams,
    inputs={
        "model": Input(type="model"),
        "masks": Input(type="head-mask", many=True),
        "dataset": Input(type="dataset"),
    },
    outputs={"metrics": "metrics"},
    version="3",  # 3: full_model_row (train's numbers reused by lineage); 2: reporting half, intervals, random masks
)
def cross_eval_stage(params: CrossEvalParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Perplexity of every language's subnetwork (rows, + the full model) and of size-matched random
    masks on the reporting half of every language's test documents (columns)."""
    model_in, data_in = get_input(inputs, "model"), get_input(inputs, "dataset")
    masks = mask_inputs(inputs)
    seed = params.eval_seed
    cols = list(params.languages) if params.languages else dataset_languages(data_in.path)
    model, _ = load_eval_model(model_in.path, ctx.gpus, ctx.job_label)
    shape = (int(model.config.num_hidden_layers), int(model.config.num_attention_heads))
    for lang, mask, _ in masks:
        if mask.shape != shape:
            raise ValueError(f"head mask of {lang!r} has shape {mask.shape}, the model has (layers, heads) {shape}")
    tokenizer = eval_tokenizer(model_in.path, data_in.path)
    batches = {
        lang: eval_batches_for(
            data_in.path,
            lang,
            tokenizer,
            model,
            params.eval_batch_size,
            seed,
            params.max_eval_chunks,
            params.mlm_probability,
            params.split,
        )
        for lang in cols
    }
    rows: list[tuple[str, np.ndarray | None]] = [(lang, mask) for lang, mask, _ in masks] + [(FULL, None)]
    seeds = random_mask_seeds(effective_seed(ctx.seed, params.seed), params.random_mask_seeds)
    randoms = random_rows([(lang, mask) for lang, mask, _ in masks], seeds)
    cells, done = (len(rows) + len(randoms)) * len(cols), [0]

    def on_cell() -> None:
        done[0] += 1
        ctx.progress(done[0], cells, "cell")

    full_row = recorded_full_model(model_in, data_in, params.split, cols, {k: getattr(params, k) for k in SETTINGS},
                                   ctx.provenance)
    ctx.progress(0, cells, "cell")
    evaluator = _CellEvaluator(model, batches, params, on_cell, full_row.cells)
    mats = cross_matrix(rows, cols, evaluator, keys=("loss", "perplexity", "perplexity_lo", "perplexity_hi"))
    rnd = cross_matrix(randoms, cols, evaluator, keys=("perplexity",))["perplexity"] if randoms else None
    labels = [name for name, _ in rows]
    ppl = mats["perplexity"]
    relative = ppl / ppl[-1][None, :]
    for i, row in enumerate(labels):
        ctx.log({f"perplexity/{row}/{col}": float(ppl[i, j]) for j, col in enumerate(cols)})
    out = ctx.output_dir("metrics")
    doc: dict[str, Any] = {
        "row_axis": "subnetwork",
        "col_axis": "eval_language",
        "rows": labels,
        "cols": cols,
        "perplexity": json_matrix(ppl),
        "loss": json_matrix(mats["loss"]),
        "perplexity_interval": json_matrix(np.stack([mats["perplexity_lo"], mats["perplexity_hi"]], axis=-1)),
        "relative_perplexity": json_matrix(relative),
        "tokens": evaluator.tokens,
        "heads_kept": {
            **{lang: int((m > 0.5).sum()) for lang, m, _ in masks},
            FULL: shape[0] * shape[1],
        },
        "eval_seed": seed,
        "eval_split": params.split,
        "max_eval_chunks": params.max_eval_chunks,
        "mlm_probability": params.mlm_probability,
        "interval": {
            "method": "percentile bootstrap over eval chunks, resamples seeded by (eval_seed, column language)",
            "level": params.interval_level,
            "resamples": params.bootstrap_resamples,
        },
        "random_mask_seeds": params.random_mask_seeds,
        "full_model_row": full_row.describe(model_in.ref),
    }
    if rnd is not None:
        langs = [lang for lang, _, _ in masks]
        by_seed = rnd.reshape(len(masks), len(seeds), len(cols))
        doc["random"] = random_section(langs, cols, [m for _, m, _ in masks], seeds, ppl[: len(masks)], by_seed)
        rel = np.asarray(doc["random"]["relative_to_random"], dtype=np.float64)
        for i, row in enumerate(langs):
            ctx.log({f"relative_to_random/{row}/{col}": float(rel[i, j]) for j, col in enumerate(cols)})
    write_json(out / CROSS_EVAL_JSON, doc)
    (out / CROSS_EVAL_CSV).write_text(matrix_csv(labels, cols, ppl, "subnetwork"), encoding="utf-8")
    diag = [float(ppl[labels.index(c), j]) for j, c in enumerate(cols) if c in labels[:-1]]
    meta = {
        "rows": labels,
        "cols": cols,
        "eval_seed": seed,
        "eval_split": params.split,
        "mean_diagonal_perplexity": float(np.mean(diag)) if diag else None,
        "full_model_row": full_row.source,
        "forward_cells": evaluator.forward_cells,
    }
    return {"metrics": meta}


CROSS_EVAL: StageDef = cross_eval_stage
