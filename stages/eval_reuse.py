"""The ungated model's perplexities that its ``train`` job already measured, reused by lineage.

``train`` evaluates the model it outputs (its best step, "after") on both test halves with the
deterministic evaluation masks (:mod:`stages.mlm`) and writes every language's loss, perplexity,
masked tokens and bootstrap interval to the model's ``metrics.json`` (``after``: the reporting half,
``select_after``: the selection half). A later stage that evaluates that same model, ungated, on the
same half runs exactly those forward passes again, unless it reads them back.

:func:`recorded_full_model` returns train's numbers when they were measured on exactly what the
caller would measure, and says why not otherwise (the caller then computes them itself):

- the model input was made by stage ``train`` (its producer record, reached through
  ``ctx.provenance["upstream"]``: the engine records every version's parameters and input versions);
- train read the **same dataset version** as the caller (the caller's dataset ref is one of train's
  inputs);
- the same evaluation settings: ``eval_seed`` (the masked positions), ``max_eval_chunks`` (which
  chunks), ``mlm_probability``, ``eval_batch_size`` (the batches), ``bootstrap_resamples`` and
  ``interval_level`` (the interval), all from train's recorded parameters;
- train evaluated in float32 without autocast (its resolved ``mixed_precision`` is ``"no"``: fp16/bf16
  autocast would give other numbers than the caller's float32 evaluation);
- ``metrics.json`` says which half ``after`` and ``select_after`` were measured on, and holds every
  language asked for.

The device is not recorded by train: with float32 on both sides, numbers measured on another device
differ from the caller's by float rounding only (relative ~1e-7, far below any interval's width). On
one CPU they are bit-identical: ``tests/test_eval_reuse.py`` checks the reused row against a computed
one exactly (train fine-tuning a saved model and from a config), and on the demo's shapes 1 and 2
threads, batches of 4 and 8 gave the same bits.

Cheap to import: standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.stage import ResolvedInput
from stages.formats.metrics import MODEL_METRICS_JSON

TRAIN_STAGE = "train"
HALF_KEYS = {"report": ("eval_split", "after"), "select": ("selection_split", "select_after")}  # half -> (split key, numbers key)
SETTINGS = ("eval_seed", "max_eval_chunks", "mlm_probability", "eval_batch_size", "bootstrap_resamples", "interval_level")
CELL_KEYS = ("loss", "perplexity", "tokens", "perplexity_lo", "perplexity_hi")


@dataclass(frozen=True)
class FullModelRow:
    """Train's numbers of the ungated model per language (``cells``), or None and why not (``reason``)."""

    cells: dict[str, dict[str, float]] | None
    reason: str

    @property
    def source(self) -> str:
        """``"train"`` (reused) or ``"computed"``."""
        return TRAIN_STAGE if self.cells is not None else "computed"

    def describe(self, model_ref: str) -> dict[str, str]:
        """What an output records about where its full-model numbers came from."""
        return {"source": self.source, "model": model_ref, "reason": self.reason}


def producer_entry(provenance: Mapping[str, Any], ref: str) -> Mapping[str, Any] | None:
    """The ``ctx.provenance["upstream"]`` entry of the version ``ref`` (None when absent or missing)."""
    for entry in provenance.get("upstream") or ():
        if isinstance(entry, Mapping) and entry.get("ref") == ref and not entry.get("missing"):
            return entry
    return None


def settings_mismatch(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """The first evaluation setting on which train's parameters differ from the caller's, as a phrase."""
    for key in SETTINGS:
        if key not in recorded:
            return f"train recorded no {key}"
        if recorded[key] != wanted[key]:
            return f"train's {key} is {recorded[key]!r}, this job's {wanted[key]!r}"
    return None


def _lineage_problem(model_in: ResolvedInput, dataset_in: ResolvedInput, provenance: Mapping[str, Any],
                     wanted: Mapping[str, Any]) -> str | None:
    entry = producer_entry(provenance, model_in.ref)
    if entry is None:
        return f"no producer record of {model_in.ref} upstream of this job"
    if entry.get("stage") != TRAIN_STAGE:
        return f"{model_in.ref} was made by stage {entry.get('stage')!r}, not train"
    if dataset_in.ref not in (entry.get("inputs") or ()):
        return f"train read other data than {dataset_in.ref} (its inputs: {', '.join(entry.get('inputs') or ()) or 'none'})"
    params = entry.get("params")
    if not isinstance(params, Mapping):
        return f"the producer record of {model_in.ref} has no parameters"
    mismatch = settings_mismatch(params, wanted)
    if mismatch is not None:
        return mismatch
    precision = model_in.metadata.get("mixed_precision")
    if precision != "no":
        return f"train evaluated with mixed_precision={precision!r}, this job in float32"
    return None


def _read_cells(doc: Mapping[str, Any], split: str, languages: Sequence[str]) -> dict[str, dict[str, float]] | str:
    split_key, numbers_key = HALF_KEYS[split]
    if doc.get(split_key) != split:
        return f"metrics.json does not say that {numbers_key!r} is the {split!r} half"
    numbers = doc.get(numbers_key)
    if not isinstance(numbers, Mapping):
        return f"metrics.json has no {numbers_key!r}"
    cells: dict[str, dict[str, float]] = {}
    for lang in languages:
        m = numbers.get(lang)
        interval = m.get("perplexity_interval") if isinstance(m, Mapping) else None
        if not isinstance(m, Mapping) or not isinstance(interval, Sequence) or len(interval) != 2 \
                or any(k not in m for k in ("loss", "perplexity", "tokens")):
            return f"metrics.json has no complete {numbers_key!r} numbers of {lang!r}"
        cells[lang] = {"loss": float(m["loss"]), "perplexity": float(m["perplexity"]), "tokens": float(m["tokens"]),
                       "perplexity_lo": float(interval[0]), "perplexity_hi": float(interval[1])}
    return cells


def recorded_full_model(
    model_in: ResolvedInput,
    dataset_in: ResolvedInput,
    split: str,
    languages: Sequence[str],
    wanted: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> FullModelRow:
    """Train's per-language numbers of the ungated ``model_in`` on half ``split`` of ``dataset_in``
    (``{lang: {"loss", "perplexity", "tokens", "perplexity_lo", "perplexity_hi"}}``) when they were
    measured exactly as the caller would measure them (``wanted``: the caller's :data:`SETTINGS`),
    else ``cells=None`` and the reason (see the module docstring)."""
    if split not in HALF_KEYS:
        return FullModelRow(None, f"train records no numbers of a {split!r} half")
    problem = _lineage_problem(model_in, dataset_in, provenance, wanted)
    if problem is not None:
        return FullModelRow(None, problem)
    path = model_in.path / MODEL_METRICS_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return FullModelRow(None, f"cannot read {MODEL_METRICS_JSON} of {model_in.ref} ({e})")
    cells = _read_cells(doc, split, languages) if isinstance(doc, Mapping) else f"{MODEL_METRICS_JSON} is not an object"
    if isinstance(cells, str):
        return FullModelRow(None, cells)
    return FullModelRow(cells, f"train measured {model_in.ref} on the same data version, half, chunks, masks, "
                               "batches and precision")
