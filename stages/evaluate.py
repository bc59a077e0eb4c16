"""Stages ``cross_eval`` and ``mask_stats``: how language-specific are the pruned subnetworks?

``cross_eval``: for every subnetwork language ``s`` (one ``head-mask`` per language) and every eval
language ``t``, the deterministic-mask perplexity (:mod:`stages.mlm`) of the model gated with mask
``s`` (:class:`stages.gating.HeadGates`) on the test set of ``t``, plus the ungated full model as the
last row ``"full"``. **Rows are subnetworks, columns are eval languages** (the original swapped the
labels of its heatmap); the JSON names both axes. Output ``metrics`` (type ``metrics``)::

    cross_eval.json  {"row_axis": "subnetwork", "col_axis": "eval_language", "rows": [..., "full"],
                      "cols": [...], "perplexity": [[...]], "loss": [[...]],
                      "relative_perplexity": [[ppl / ppl of the full model on that column]],
                      "tokens": {lang: masked tokens}, "heads_kept": {row: n}, "eval_seed", ...}
    cross_eval.csv   header "subnetwork,<lang>,...", one row per subnetwork (perplexity)

``mask_stats`` (numpy only): per layer, the proportion of heads masked (mean over languages of
masked/heads **in that layer**; the original summed the wrong axis), heads kept per language, the
share of parameters removed, and the Jaccard index of the **kept** heads for every pair of
languages. Output ``metrics``: ``mask_stats.json``.

Parameters counted as removed with a masked head (XLM-R/BERT self-attention, per layer, head_dim
d = hidden/heads): the head's d rows of the query, key and value weights and their d bias entries
each, and its d input columns of the attention output projection: ``4*hidden*d + 3*d`` per head.
Not counted: the output projection's bias and the LayerNorm (shared by all heads). Proportions are
given relative to all self-attention parameters (``L * (4*hidden^2 + 4*hidden)``) and, when the
model's parameter count is known (mask.json ``num_parameters`` or the ``total_params`` parameter),
relative to the whole model.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from orchestrator.stage import Input, Inputs, ResolvedInput, StageContext, StageDef, StageParams, stage
from stages._io import get_input, write_json
from stages.mlm import EvalParams
from stages.prune import read_mask_dir

FULL = "full"

# --------------------------------------------------------------------------------------------------
# Reading head masks
# --------------------------------------------------------------------------------------------------


def mask_inputs(inputs: Inputs, name: str = "masks") -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """``(language, mask, mask.json)`` of every ``head-mask`` input, in input order.

    The language comes from the producing job's matrix point, else mask.json, else the artifact
    metadata. Two masks of the same language are an error.
    """
    value = inputs.get(name)
    if value is None:
        raise ValueError(f"input {name!r} is missing: connect the head-mask artifacts (one per language)")
    items: list[ResolvedInput] = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"input {name!r} is empty: no head-mask artifact")
    out: list[tuple[str, np.ndarray, dict[str, Any]]] = []
    for inp in items:
        mask, info = read_mask_dir(inp.path)
        lang = inp.point.get("language") or info.get("language") or inp.metadata.get("language")
        if not lang:
            raise ValueError(f"head mask {inp.ref} does not say its language (matrix point, mask.json, metadata)")
        if any(lang == seen for seen, _, _ in out):
            raise ValueError(f"two head masks for language {lang!r} (the second is {inp.ref})")
        if lang == FULL:
            raise ValueError(f"a head mask may not be named {FULL!r}: the name of the unpruned model's row")
        out.append((str(lang), mask, info))
    shapes = {m.shape for _, m, _ in out}
    if len(shapes) != 1:
        raise ValueError(f"head masks have different shapes: {sorted(shapes)}")
    return out


# --------------------------------------------------------------------------------------------------
# mask_stats: pure numpy
# --------------------------------------------------------------------------------------------------


def stack_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """``[n_languages, L, H]`` boolean array of kept heads (mask values > 0.5)."""
    arr = np.stack([np.asarray(m, dtype=np.float64) for m in masks])
    if arr.ndim != 3:
        raise ValueError(f"expected [layers, heads] masks, got stacked shape {arr.shape}")
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("head masks must be 0/1")
    return arr > 0.5


def masked_per_layer(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[L]: mean over languages of (masked heads in the layer / heads per layer)."""
    kept = stack_masks(masks)
    return (~kept).mean(axis=2).mean(axis=0)


def masked_per_layer_by_language(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n_languages, L]: masked heads in each layer / heads per layer."""
    return (~stack_masks(masks)).mean(axis=2)


def heads_kept(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n_languages]: number of kept heads."""
    return stack_masks(masks).sum(axis=(1, 2))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of the kept heads of two masks (1.0 when both keep nothing)."""
    ka, kb = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    union = int((ka | kb).sum())
    return 1.0 if union == 0 else int((ka & kb).sum()) / union


def jaccard_matrix(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n, n] Jaccard index of kept heads for every pair of masks (symmetric, diagonal 1)."""
    n = len(masks)
    out = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = jaccard(masks[i], masks[j])
    return out


def attention_params_per_head(hidden_size: int, num_heads: int) -> int:
    """Parameters removed with one head: Q, K, V rows (+ biases) and output-projection columns."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
    d = hidden_size // num_heads
    return 4 * hidden_size * d + 3 * d


def attention_params_per_layer(hidden_size: int) -> int:
    """Self-attention parameters of one layer: Q, K, V, output projection, weights and biases."""
    return 4 * hidden_size * hidden_size + 4 * hidden_size


def params_removed(mask: np.ndarray, hidden_size: int) -> int:
    """Parameters functionally removed by the masked heads of one mask."""
    mask = np.asarray(mask)
    return int((mask <= 0.5).sum()) * attention_params_per_head(hidden_size, mask.shape[1])


def mask_statistics(
    languages: Sequence[str],
    masks: Sequence[np.ndarray],
    hidden_size: int | None = None,
    total_params: int | None = None,
) -> dict[str, Any]:
    """Everything ``mask_stats`` writes, from the masks (and optionally the model's sizes)."""
    kept = stack_masks(masks)
    n_layers, n_heads = kept.shape[1:]
    jac = jaccard_matrix(masks)
    by_lang = masked_per_layer_by_language(masks)
    pairs = [
        {"a": languages[i], "b": languages[j], "jaccard": float(jac[i, j])}
        for i in range(len(languages))
        for j in range(i + 1, len(languages))
    ]
    stats: dict[str, Any] = {
        "languages": list(languages),
        "num_layers": int(n_layers),
        "num_heads": int(n_heads),
        "total_heads": int(n_layers * n_heads),
        "heads_kept": {lang: int(n) for lang, n in zip(languages, kept.sum(axis=(1, 2)), strict=True)},
        "proportion_heads_masked": {
            lang: float(1 - n / (n_layers * n_heads)) for lang, n in zip(languages, kept.sum(axis=(1, 2)), strict=True)
        },
        "masked_per_layer": masked_per_layer(masks).tolist(),
        "masked_per_layer_by_language": {lang: row.tolist() for lang, row in zip(languages, by_lang, strict=True)},
        "heads_kept_by_all": int(kept.all(axis=0).sum()),
        "heads_kept_by_any": int(kept.any(axis=0).sum()),
        "jaccard": {"labels": list(languages), "matrix": jac.tolist()},
        "jaccard_pairs": pairs,
        "jaccard_min": min((p["jaccard"] for p in pairs), default=None),
        "jaccard_max": max((p["jaccard"] for p in pairs), default=None),
        "jaccard_mean": float(np.mean([p["jaccard"] for p in pairs])) if pairs else None,
        "parameter_counting": (
            "per masked head: its head_dim rows of the query, key and value weights and biases and its head_dim "
            "input columns of the attention output projection (4*hidden*head_dim + 3*head_dim); output-projection "
            "bias and LayerNorm not counted"
        ),
        "hidden_size": hidden_size,
        "total_params": total_params,
    }
    if hidden_size is not None:
        removed = {lang: params_removed(m, hidden_size) for lang, m in zip(languages, masks, strict=True)}
        attn_total = n_layers * attention_params_per_layer(hidden_size)
        stats["params_removed"] = removed
        stats["attention_params"] = attn_total
        stats["proportion_attention_params_removed"] = {k: v / attn_total for k, v in removed.items()}
        if total_params:
            stats["proportion_params_removed"] = {k: v / total_params for k, v in removed.items()}
    return stats


# --------------------------------------------------------------------------------------------------
# cross_eval: the matrix, given a perplexity function
# --------------------------------------------------------------------------------------------------


def cross_matrix(
    rows: Sequence[tuple[str, np.ndarray | None]],
    cols: Sequence[str],
    eval_fn: Callable[[np.ndarray | None, str], Mapping[str, float]],
) -> dict[str, np.ndarray]:
    """``{"loss", "perplexity"}`` matrices [rows, cols]: ``eval_fn(mask or None, eval_language)``
    (None = the ungated model) for every row mask and column language."""
    loss = np.full((len(rows), len(cols)), np.nan)
    ppl = np.full((len(rows), len(cols)), np.nan)
    for i, (_, mask) in enumerate(rows):
        for j, lang in enumerate(cols):
            res = eval_fn(mask, lang)
            loss[i, j], ppl[i, j] = float(res["loss"]), float(res["perplexity"])
    return {"loss": loss, "perplexity": ppl}


def matrix_csv(row_labels: Sequence[str], col_labels: Sequence[str], values: np.ndarray, corner: str) -> str:
    """A labelled matrix as CSV text (header ``corner,<cols>``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([corner, *col_labels])
    for label, row in zip(row_labels, values, strict=True):
        w.writerow([label, *(repr(float(v)) for v in row)])
    return buf.getvalue()


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


class CrossEvalParams(EvalParams):
    """Parameters of the ``cross_eval`` stage."""

    languages: list[str] | None = Field(None, description="Eval languages (columns); None: every language of the dataset.")


@stage(
    "cross_eval",
    params=CrossEvalParams,
    inputs={
        "model": Input(type="model"),
        "masks": Input(type="head-mask", many=True),
        "dataset": Input(type="dataset"),
    },
    outputs={"metrics": "metrics"},
    version="1",
)
def cross_eval_stage(params: CrossEvalParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Perplexity of every language's subnetwork (rows, + the full model) on every test set (columns)."""
    from tqdm.auto import tqdm

    from stages.gating import HeadGates
    from stages.mlm import dataset_languages, evaluate
    from stages.prune import eval_batches_for, eval_tokenizer, load_eval_model

    model_in, data_in = get_input(inputs, "model"), get_input(inputs, "dataset")
    masks = mask_inputs(inputs)
    seed = params.eval_seed
    cols = list(params.languages) if params.languages else dataset_languages(data_in.path)
    model, _ = load_eval_model(model_in.path)
    shape = (int(model.config.num_hidden_layers), int(model.config.num_attention_heads))
    for lang, mask, _ in masks:
        if mask.shape != shape:
            raise ValueError(f"head mask of {lang!r} has shape {mask.shape}, the model has (layers, heads) {shape}")
    tokenizer = eval_tokenizer(model_in.path, data_in.path)
    batches = {
        lang: eval_batches_for(
            data_in.path, lang, tokenizer, model, params.eval_batch_size, seed, params.max_eval_chunks, params.mlm_probability
        )
        for lang in cols
    }
    rows: list[tuple[str, np.ndarray | None]] = [(lang, mask) for lang, mask, _ in masks] + [(FULL, None)]
    bar = tqdm(total=len(rows) * len(cols), desc="cross_eval", unit="cell", leave=False)
    tokens: dict[str, int] = {}

    def eval_fn(mask: np.ndarray | None, lang: str) -> Mapping[str, float]:
        if mask is None:
            res = evaluate(model, batches[lang])  # the full model: no hooks at all
        else:
            with HeadGates(model, mask):
                res = evaluate(model, batches[lang])
        tokens[lang] = int(res["tokens"])
        bar.update(1)
        return res

    try:
        mats = cross_matrix(rows, cols, eval_fn)
    finally:
        bar.close()
    labels = [name for name, _ in rows]
    ppl = mats["perplexity"]
    relative = ppl / ppl[-1][None, :]
    for i, row in enumerate(labels):
        ctx.log({f"perplexity/{row}/{col}": float(ppl[i, j]) for j, col in enumerate(cols)})
    out = ctx.output_dir("metrics")
    doc = {
        "row_axis": "subnetwork",
        "col_axis": "eval_language",
        "rows": labels,
        "cols": cols,
        "perplexity": [[_finite(v) for v in row] for row in ppl],
        "loss": [[_finite(v) for v in row] for row in mats["loss"]],
        "relative_perplexity": [[_finite(v) for v in row] for row in relative],
        "tokens": tokens,
        "heads_kept": {
            **{lang: int((m > 0.5).sum()) for lang, m, _ in masks},
            FULL: shape[0] * shape[1],
        },
        "eval_seed": seed,
        "max_eval_chunks": params.max_eval_chunks,
        "mlm_probability": params.mlm_probability,
    }
    write_json(out / "cross_eval.json", doc)
    (out / "cross_eval.csv").write_text(matrix_csv(labels, cols, ppl, "subnetwork"), encoding="utf-8")
    diag = [float(ppl[labels.index(c), j]) for j, c in enumerate(cols) if c in labels[:-1]]
    meta = {"rows": labels, "cols": cols, "eval_seed": seed, "mean_diagonal_perplexity": float(np.mean(diag)) if diag else None}
    return {"metrics": meta}


class MaskStatsParams(StageParams):
    """Parameters of the ``mask_stats`` stage."""

    hidden_size: int | None = Field(
        None, ge=1, description="Model hidden size for parameter counts; None: from mask.json (hidden_size)."
    )
    total_params: int | None = Field(
        None, ge=1, description="Model parameter count; None: from mask.json (num_parameters), if any."
    )


@stage(
    "mask_stats",
    params=MaskStatsParams,
    inputs={"masks": Input(type="head-mask", many=True)},
    outputs={"metrics": "metrics"},
    version="1",
)
def mask_stats_stage(params: MaskStatsParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Proportion of heads masked per layer, parameters removed and Jaccard of kept heads per language pair."""
    masks = mask_inputs(inputs)
    langs = [lang for lang, _, _ in masks]
    arrays = [m for _, m, _ in masks]
    hidden = params.hidden_size or _agreed(masks, "hidden_size")
    total = params.total_params or _agreed(masks, "num_parameters")
    stats = mask_statistics(langs, arrays, hidden, total)
    write_json(ctx.output_dir("metrics") / "mask_stats.json", stats)
    ctx.log({f"heads_kept/{lang}": float(n) for lang, n in stats["heads_kept"].items()})
    ctx.log({f"masked_per_layer/{i}": float(v) for i, v in enumerate(stats["masked_per_layer"])})
    meta = {k: stats[k] for k in ("languages", "heads_kept", "jaccard_min", "jaccard_max", "jaccard_mean")}
    return {"metrics": meta}


def _agreed(masks: Sequence[tuple[str, np.ndarray, dict[str, Any]]], key: str) -> int | None:
    """The value of ``key`` in the masks' mask.json, when present and the same in all of them."""
    values = {info.get(key) for _, _, info in masks} - {None}
    if len(values) > 1:
        raise ValueError(f"head masks disagree on {key}: {sorted(values)}; they come from different models")
    return int(values.pop()) if values else None


CROSS_EVAL: StageDef = cross_eval_stage
MASK_STATS: StageDef = mask_stats_stage
