"""Stage ``prune``: head importance and iterative head pruning for one language (Michel et al. 2019).

The loop itself is pure (numpy only) and lives in :mod:`stages.prune_loop` (:func:`iterative_prune`,
:func:`normalize_importance`, :func:`next_mask`, :func:`heads_per_step`, re-exported here). This
module holds the model side:

- :func:`gated_pass`: one pass over the batches under the gates' current mask that gives both the
  perplexity of that mask (every chunk's summed masked-token loss, as :func:`stages.mlm.evaluate`
  computes it) and, optionally, the head importance ``|dL/dg|`` under it (as :func:`head_importance`
  computes it) from the same forward: the loop measures each mask once (:func:`model_measure`).
- :func:`head_importance`: ``|dL/dg|`` of the head gates, accumulated **per batch** (the gate
  gradient is zeroed between batches; ``run_bertology`` added the running sum of gradients, which
  over-weights early batches), divided by the number of masked (predicted) tokens.
- :func:`prune_model`: the loop on a loaded model and its batches (what the stage runs).

Held-out text: importance, P0 and every step's perplexity are measured on the **selection half** of
the language's test documents (``split="select"``, the default; ``stages.dataset``), so that the
mask is chosen without looking at the reporting half on which ``cross_eval`` reports it. The half
used is recorded as ``eval_split`` in mask.json.

Output ``mask`` (type ``head-mask``): ``mask.npy``, ``mask.json``, ``importance.npy``, ``importance_raw.npy``
and ``trajectory.json``, laid out and written by :mod:`stages.formats.masks`. The model, its tokenizer and
the masked batches come from :mod:`stages.eval_model`, shared with ``cross_eval``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from orchestrator.stage import Input, Inputs, StageContext, StageDef, stage
from stages._io import get_input
from stages.eval_model import eval_batches_for, eval_tokenizer, load_eval_model, model_facts
from stages.formats.masks import write_mask_dir
from stages.mlm import EvalParams
from stages.perplexity import ChunkLosses
from stages.prune_loop import Measure, NormalizeOver, PruneResult, PruneStep, heads_per_step, iterative_prune
from stages.prune_loop import next_mask as next_mask  # re-exported: the loop's pure functions, importable from here
from stages.prune_loop import normalize_importance as normalize_importance

# --------------------------------------------------------------------------------------------------
# Importance on a model (torch, imported lazily)
# --------------------------------------------------------------------------------------------------


def head_importance(
    model: Any,
    gates: Any,
    batches: Iterable[Mapping[str, Any]],
    loss_fn: Callable[[Any, Mapping[str, Any]], tuple[Any, int]] | None = None,
) -> np.ndarray:
    """Michel et al. head importance: sum over batches of ``|dL/dg|``, divided by the masked tokens.

    ``gates`` is a :class:`stages.gating.HeadGates` (or its [L, H] leaf tensor) attached to
    ``model``; its current values are the mask (masked heads 0). ``L`` is each batch's mean MLM loss
    over its masked positions (``loss_fn(model, batch) -> (loss, n_masked)``, default
    :func:`stages.mlm.mlm_loss`); each batch's gradient is taken on its own (never the running sum)
    and its absolute value added up; the sum is divided by the total number of masked tokens. Only
    the gates get gradients: the parameters are frozen for the pass and their flags restored.
    """
    import torch

    from stages.mlm import mlm_loss

    compute_loss = mlm_loss if loss_fn is None else loss_fn
    gate = _gate_tensor(gates)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_gate_flag = gate.requires_grad
    was_training = model.training
    total = torch.zeros(tuple(gate.shape), dtype=torch.float64)
    tokens = 0
    try:
        for p in params:
            p.requires_grad_(False)
        gate.requires_grad_(True)
        model.eval()
        device = params[0].device if params else gate.device
        for batch in batches:
            gate.grad = None  # per batch: never accumulate the running sum of gradients
            moved = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            loss, n = compute_loss(model, moved)
            if n == 0:
                continue
            (grad,) = torch.autograd.grad(loss, [gate])
            total += grad.detach().abs().to(torch.float64).cpu()
            tokens += int(n)
    finally:
        for p, flag in zip(params, saved_flags, strict=True):
            p.requires_grad_(flag)
        gate.requires_grad_(saved_gate_flag)
        gate.grad = None
        model.train(was_training)
    if tokens == 0:
        raise ValueError("head_importance: the batches contain no masked tokens")
    return (total / tokens).numpy()


def _gate_tensor(gates: Any) -> Any:
    """The leaf [L, H] tensor of a gate holder (a tensor, or an object with ``.gates``)."""
    import torch

    if isinstance(gates, torch.Tensor):
        return gates
    value = getattr(gates, "gates", None)
    if isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"cannot find the gate tensor of {type(gates).__name__}")


@dataclass
class MaskPass:
    """What :func:`gated_pass` measures under one mask."""

    losses: ChunkLosses  # every chunk's summed masked-token loss and count: the perplexity of the mask
    importance: np.ndarray | None  # float64 [L, H] raw importance (as head_importance), None if not asked for

    @property
    def perplexity(self) -> float:
        return float(self.losses.summary()["perplexity"])


def gated_pass(model: Any, gates: Any, batches: Sequence[Mapping[str, Any]], importance: bool = True) -> MaskPass:
    """One pass over ``batches`` under the gates' current values: the perplexity and the importance.

    Per batch, one forward computes the cross-entropy of every masked position. Its float64 sums per
    chunk are what :func:`stages.mlm.evaluate` sums (the same forward, so the same perplexity); with
    ``importance``, the gradient of the batch's mean of those losses with respect to the gates is
    taken (``torch.autograd.grad``, parameters frozen) and ``|dL/dg|`` added up and divided by the
    masked tokens, as :func:`head_importance` does. Without ``importance`` the pass runs under
    ``torch.no_grad()``. Parameter flags, the gate flag and the model's mode are restored.
    """
    import torch

    from stages.mlm import EVAL_KEYS, IGNORE_INDEX, model_device

    gate = _gate_tensor(gates)
    params = list(model.parameters())
    saved = ([p.requires_grad for p in params], gate.requires_grad, model.training)
    total = torch.zeros(tuple(gate.shape), dtype=torch.float64)
    tokens = 0
    sums: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    try:
        for p in params:
            p.requires_grad_(False)
        gate.requires_grad_(importance)
        model.eval()
        device = model_device(model)
        for batch in batches:
            moved = {k: v.to(device) for k, v in batch.items() if k in EVAL_KEYS}
            selected = moved["labels"] != IGNORE_INDEX
            n = int(selected.sum())
            row_sums = torch.zeros(selected.shape[0], dtype=torch.float64, device=device)
            if n > 0:
                with torch.set_grad_enabled(importance):
                    token_loss = _masked_token_losses(model, moved, selected)
                if importance:
                    (grad,) = torch.autograd.grad(token_loss.sum() / n, [gate])
                    total += grad.detach().abs().to(torch.float64).cpu()
                    tokens += n
                rows = selected.nonzero()[:, 0]
                row_sums.index_add_(0, rows, token_loss.detach().to(torch.float64))
            sums.append(row_sums.cpu().numpy())
            counts.append(selected.sum(dim=1).cpu().numpy().astype(np.int64))
    finally:
        for p, flag in zip(params, saved[0], strict=True):
            p.requires_grad_(flag)
        gate.requires_grad_(saved[1])
        gate.grad = None
        model.train(saved[2])
    if not sums:
        raise ValueError("gated_pass: no batches")
    if importance and tokens == 0:
        raise ValueError("gated_pass: the batches contain no masked tokens")
    return MaskPass(ChunkLosses(np.concatenate(sums), np.concatenate(counts)), (total / tokens).numpy() if importance else None)


def _masked_token_losses(model: Any, batch: Mapping[str, Any], selected: Any) -> Any:
    """The float32 cross-entropy of every masked position, in row-major order: the forward of
    :func:`stages.mlm.chunk_loss_sums` (vocabulary projection at the masked positions only)."""
    import torch.nn.functional as F

    from stages.mlm import masked_logits

    logits = masked_logits(model, batch, selected)
    return F.cross_entropy(logits.float(), batch["labels"][selected], reduction="none")


def model_measure(model: Any, gates: Any, batches: Sequence[Mapping[str, Any]]) -> Measure:
    """The ``measure`` of :func:`iterative_prune` on a model: set the gates to the mask, one :func:`gated_pass`."""

    def measure(mask: np.ndarray, want_importance: bool) -> tuple[float, np.ndarray | None]:
        gates.set(mask)
        measured = gated_pass(model, gates, batches, importance=want_importance)
        return measured.perplexity, measured.importance

    return measure


def prune_model(
    model: Any,
    batches: Sequence[Mapping[str, Any]],
    threshold: float,
    masking_amount: float,
    min_heads: int = 1,
    *,
    normalize_layers: bool = True,
    normalize_global: bool = True,
    normalize_over: NormalizeOver = "all",
    on_step: Callable[[PruneStep], None] | None = None,
) -> PruneResult:
    """:func:`iterative_prune` of ``model``'s heads on ``batches`` (gates attached for the run and removed after)."""
    from stages.gating import HeadGates, gate_shape

    n_layers, n_heads = gate_shape(model)
    with HeadGates(model) as gates:
        return iterative_prune(
            n_layers,
            n_heads,
            model_measure(model, gates, batches),
            threshold,
            masking_amount,
            min_heads,
            normalize_layers=normalize_layers,
            normalize_global=normalize_global,
            normalize_over=normalize_over,
            on_step=on_step,
        )


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------


class PruneParams(EvalParams):
    """Parameters of the ``prune`` stage."""

    language: str = Field(..., min_length=1, description="Language whose selection half of the test split drives pruning.")
    threshold: float = Field(1.1, gt=1.0, description="Stop when perplexity > P0 * threshold (original: 1.1).")
    masking_amount: float = Field(
        0.1, gt=0.0, lt=1.0, description="Heads masked per step: max(1, int(L*H*masking_amount)) (0.1 -> 14 of 144)."
    )
    normalize_layers: bool = Field(True, description="Divide each layer's importance by its L2 norm.")
    normalize_global: bool = Field(True, description="Min-max the importance to [0, 1].")
    normalize_over: NormalizeOver = Field(
        "all",
        description="Heads in the layer norms and the min-max: 'all' (as specified and in run_bertology) or 'kept' "
        "(leave already-masked heads out)",
    )
    min_heads: int = Field(1, ge=1, description="Never keep fewer heads than this.")


@stage(
    "prune",
    params=PruneParams,
    inputs={"model": Input(type="model"), "dataset": Input(type="dataset")},
    outputs={"mask": "head-mask"},
    version="3",  # 3: evaluates the selection half (split); 2: normalize_over, default "all"
)
def prune_stage(params: PruneParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Iteratively prune attention heads for one language until perplexity exceeds P0 * threshold."""
    model_in, data_in = get_input(inputs, "model"), get_input(inputs, "dataset")
    seed = params.eval_seed
    model, _ = load_eval_model(model_in.path, ctx.gpus, ctx.job_label)
    tokenizer = eval_tokenizer(model_in.path, data_in.path)
    batches = eval_batches_for(
        data_in.path,
        params.language,
        tokenizer,
        model,
        params.eval_batch_size,
        seed,
        params.max_eval_chunks,
        params.mlm_probability,
        params.split,
    )
    facts = model_facts(model)
    n_layers, n_heads = facts["num_layers"], facts["num_heads"]
    k = heads_per_step(n_layers, n_heads, params.masking_amount)
    steps = max(0, (n_layers * n_heads - params.min_heads) // k)  # at most: pruning stops at the threshold

    def on_step(point: PruneStep) -> None:
        ctx.log(
            {"heads_kept": float(point.heads_kept), "perplexity": point.perplexity, "accepted": float(point.accepted)},
            step=point.step,
        )
        ctx.progress(min(point.step, steps), steps, "step")

    result = prune_model(
        model,
        batches,
        params.threshold,
        params.masking_amount,
        params.min_heads,
        normalize_layers=params.normalize_layers,
        normalize_global=params.normalize_global,
        normalize_over=params.normalize_over,
        on_step=on_step,
    )
    meta = {
        "language": params.language,
        "heads_kept": int(result.mask.sum()),
        "total_heads": n_layers * n_heads,
        "perplexity_full": result.perplexity_full,
        "perplexity_final": result.perplexity_final,
        "threshold": params.threshold,
        "threshold_perplexity": result.threshold_perplexity,
        "normalize_layers": params.normalize_layers,
        "normalize_global": params.normalize_global,
        "normalize_over": params.normalize_over,
        "heads_per_step": k,
        "steps_accepted": sum(1 for s in result.trajectory[1:] if s.accepted),
        "stop_reason": result.stop_reason,
        "eval_seed": seed,
        "eval_split": params.split,
        "eval_chunks": int(sum(len(b["input_ids"]) for b in batches)),
        **facts,
    }
    trajectory = [step.as_dict() for step in result.trajectory]
    write_mask_dir(ctx.output_dir("mask"), result.mask, result.importances, result.raw_importances, trajectory, meta)
    ctx.log(
        {
            "heads_kept_final": float(meta["heads_kept"]),
            "perplexity_final": result.perplexity_final,
            "perplexity_full": result.perplexity_full,
        }
    )
    return {"mask": meta}


PRUNE: StageDef = prune_stage
