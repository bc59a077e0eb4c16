"""Stage ``prune``: head importance and iterative head pruning for one language (Michel et al. 2019).

The algorithm is kept in pure functions so that it can be tested without a model:

- :func:`normalize_importance`: each layer's row divided by its L2 norm (+1e-20), then min-max over
  the heads to [0, 1] (both switchable, as ``run_bertology``'s two ``dont_normalize_*`` flags).
  ``normalize_over`` picks the heads: ``"all"`` (the default, as the method is specified and as
  ``run_bertology`` does: a masked head's gate gradient still enters its layer's norm and the
  min/max) or ``"kept"`` (masked heads are left out and come out 0, so that a removed head cannot
  rescale the scores of the heads still alive in its layer). With the all-ones mask of the first
  step both agree; the mask artifact records which was used.
- :func:`next_mask`: mask the ``k`` lowest-importance **unmasked** heads globally (ties broken by
  flat index, as a stable sort).
- :func:`heads_per_step`: ``k = max(1, int(L * H * masking_amount))`` (14 of 144 at 0.1).
- :func:`iterative_prune`: P0 = perplexity of the starting mask, T = P0 * threshold; each step
  computes importance under the current mask, masks ``k`` more heads and measures the perplexity;
  a step whose perplexity exceeds T is rejected and ends the loop, as does a step that would leave
  fewer than ``min_heads`` heads. Returns the **last accepted** mask.
- :func:`head_importance`: ``|dL/dg|`` of the head gates, accumulated **per batch** (the gate
  gradient is zeroed between batches; ``run_bertology`` added the running sum of gradients, which
  over-weights early batches), divided by the number of masked (predicted) tokens.

Held-out text: importance, P0 and every step's perplexity are measured on the **selection half** of
the language's test documents (``split="select"``, the default; ``stages.dataset``), so that the
mask is chosen without looking at the reporting half on which ``cross_eval`` reports it. The half
used is recorded as ``eval_split`` in mask.json.

Output ``mask`` (type ``head-mask``): ``mask.npy``, ``mask.json``, ``importance.npy``, ``importance_raw.npy``
and ``trajectory.json``, laid out and written by :mod:`stages.formats.masks`. The model, its tokenizer and
the masked batches come from :mod:`stages.eval_model`, shared with ``cross_eval``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from orchestrator.stage import Input, Inputs, StageContext, StageDef, stage
from stages._io import get_input
from stages.eval_model import eval_batches_for, eval_tokenizer, load_eval_model, model_facts
from stages.formats.masks import write_mask_dir
from stages.mlm import EvalParams

# --------------------------------------------------------------------------------------------------
# Pure algorithm (numpy only)
# --------------------------------------------------------------------------------------------------


def heads_per_step(n_layers: int, n_heads: int, masking_amount: float) -> int:
    """How many heads one pruning step masks: ``max(1, int(L * H * masking_amount))``."""
    return max(1, int(n_layers * n_heads * masking_amount))


NormalizeOver = Literal["all", "kept"]


def normalize_importance(
    imp: np.ndarray,
    by_layer: bool = True,
    global_minmax: bool = True,
    mask: np.ndarray | None = None,
    over: NormalizeOver = "all",
) -> np.ndarray:
    """Normalise a [L, H] importance matrix.

    ``by_layer``: divide each layer's row by its L2 norm + 1e-20. ``global_minmax``: then rescale to
    [0, 1] by the min and max over the heads. ``over`` says which heads: ``"all"`` (as specified,
    and as run_bertology does: a masked head's gate still has a gradient, so its importance enters
    its layer's norm and the min/max) or ``"kept"`` (with ``mask``, 1 = kept: masked heads are set
    to 0 before the layer norms, left out of the min/max and returned as 0). The choice changes
    which heads are masked next from the second pruning step on, since a masked head's importance
    changes its layer's norm. A constant matrix becomes all zeros.
    """
    if over not in ("all", "kept"):
        raise ValueError(f"normalize over 'all' or 'kept' heads, not {over!r}")
    out = np.array(imp, dtype=np.float64, copy=True)
    if out.ndim != 2:
        raise ValueError(f"importance must be [layers, heads], got shape {out.shape}")
    kept = np.ones(out.shape, dtype=bool) if mask is None else np.asarray(mask) > 0.5
    if kept.shape != out.shape:
        raise ValueError(f"mask shape {kept.shape} does not match importance shape {out.shape}")
    counted = kept if over == "kept" else np.ones(out.shape, dtype=bool)
    out[~counted] = 0.0
    if by_layer:
        norms = np.sqrt((out**2).sum(axis=-1, keepdims=True))
        out = out / (norms + 1e-20)
    if global_minmax and counted.any():
        lo, hi = out[counted].min(), out[counted].max()
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        out[~counted] = 0.0
    return out


def next_mask(mask: np.ndarray, importance: np.ndarray, k: int) -> np.ndarray:
    """A copy of ``mask`` with the ``k`` lowest-importance unmasked heads masked (globally).

    Already-masked heads are never chosen; ties go to the lower flat index. Raises if fewer than
    ``k`` heads are unmasked.
    """
    mask = np.asarray(mask, dtype=np.float32)
    importance = np.asarray(importance, dtype=np.float64)
    if mask.shape != importance.shape:
        raise ValueError(f"mask shape {mask.shape} does not match importance shape {importance.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    flat_mask = mask.reshape(-1)
    alive = np.flatnonzero(flat_mask > 0.5)
    if k > alive.size:
        raise ValueError(f"cannot mask {k} heads: only {alive.size} remain")
    scores = importance.reshape(-1)[alive]
    if np.isnan(scores).any():
        raise ValueError("importance contains NaN for unmasked heads")
    chosen = alive[np.argsort(scores, kind="stable")[:k]]
    new = flat_mask.copy()
    new[chosen] = 0.0
    return new.reshape(mask.shape)


@dataclass
class PruneStep:
    """One point of the pruning trajectory (step 0 is the starting mask)."""

    step: int
    heads_kept: int
    perplexity: float
    accepted: bool

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "heads_kept": self.heads_kept, "perplexity": self.perplexity, "accepted": self.accepted}


@dataclass
class PruneResult:
    """What :func:`iterative_prune` returns."""

    mask: np.ndarray  # float32 [L, H], the last accepted mask
    trajectory: list[PruneStep]
    importances: np.ndarray  # float64 [steps, L, H], normalised importance used at each step
    raw_importances: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    threshold_perplexity: float = math.nan
    stop_reason: str = ""

    @property
    def perplexity_full(self) -> float:
        return self.trajectory[0].perplexity

    @property
    def perplexity_final(self) -> float:
        return [s for s in self.trajectory if s.accepted][-1].perplexity


def iterative_prune(
    n_layers: int,
    n_heads: int,
    importance_fn: Callable[[np.ndarray], np.ndarray],
    perplexity_fn: Callable[[np.ndarray], float],
    threshold: float,
    masking_amount: float,
    min_heads: int = 1,
    *,
    normalize_layers: bool = True,
    normalize_global: bool = True,
    normalize_over: NormalizeOver = "all",
    initial_mask: np.ndarray | None = None,
    on_step: Callable[[PruneStep], None] | None = None,
) -> PruneResult:
    """Iteratively mask the least important heads until perplexity exceeds ``P0 * threshold``.

    ``importance_fn(mask)`` returns raw [L, H] importance under ``mask``; ``perplexity_fn(mask)``
    the perplexity with ``mask`` applied. Each step: importance under the current mask, normalise,
    mask ``heads_per_step`` more heads, measure perplexity. The loop stops (without taking the step)
    when the step would leave fewer than ``min_heads`` heads, and stops (rejecting the step) when its
    perplexity is above the threshold. ``on_step`` is called for every trajectory point.
    """
    shape = (n_layers, n_heads)
    mask = _start_mask(shape, threshold, min_heads, initial_mask)
    k = heads_per_step(n_layers, n_heads, masking_amount)

    def record(point: PruneStep) -> None:
        trajectory.append(point)
        if on_step is not None:
            on_step(point)

    trajectory: list[PruneStep] = []
    p0 = float(perplexity_fn(mask.copy()))
    if not math.isfinite(p0):
        raise ValueError(f"perplexity of the starting mask is not finite ({p0})")
    limit = p0 * threshold
    record(PruneStep(0, int(mask.sum()), p0, True))
    imps: list[np.ndarray] = []
    raws: list[np.ndarray] = []
    stop_reason = ""
    step = 0
    while True:
        kept = int(mask.sum())
        if kept - k < min_heads:
            stop_reason = f"min_heads: masking {k} more of {kept} heads would leave fewer than {min_heads}"
            break
        step += 1
        raw = np.asarray(importance_fn(mask.copy()), dtype=np.float64)
        if raw.shape != shape:
            raise ValueError(f"importance_fn returned shape {raw.shape}, expected {shape}")
        imp = normalize_importance(raw, normalize_layers, normalize_global, mask=mask, over=normalize_over)
        raws.append(raw)
        imps.append(imp)
        candidate = next_mask(mask, imp, k)
        ppl = float(perplexity_fn(candidate.copy()))
        accepted = math.isfinite(ppl) and ppl <= limit
        record(PruneStep(step, int(candidate.sum()), ppl, accepted))
        if not accepted:
            stop_reason = f"threshold: perplexity {ppl:.4g} > {limit:.4g}"
            break
        mask = candidate
    empty = np.zeros((0, *shape))
    return PruneResult(
        mask=mask,
        trajectory=trajectory,
        importances=np.stack(imps) if imps else empty,
        raw_importances=np.stack(raws) if raws else empty,
        threshold_perplexity=limit,
        stop_reason=stop_reason,
    )


def _start_mask(shape: tuple[int, int], threshold: float, min_heads: int, initial_mask: np.ndarray | None) -> np.ndarray:
    """Validate :func:`iterative_prune`'s arguments; the float32 mask it starts from."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if min_heads < 0:
        raise ValueError(f"min_heads must be >= 0, got {min_heads}")
    mask = np.ones(shape, np.float32) if initial_mask is None else np.asarray(initial_mask, np.float32).copy()
    if mask.shape != shape:
        raise ValueError(f"initial_mask shape {mask.shape} is not {shape}")
    return mask


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
    from stages.gating import HeadGates
    from stages.mlm import evaluate

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

    with HeadGates(model) as gates:

        def importance_fn(mask: np.ndarray) -> np.ndarray:
            gates.set(mask)
            return head_importance(model, gates, batches)

        def perplexity_fn(mask: np.ndarray) -> float:
            gates.set(mask)
            return float(evaluate(model, batches)["perplexity"])

        result = iterative_prune(
            n_layers,
            n_heads,
            importance_fn,
            perplexity_fn,
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
