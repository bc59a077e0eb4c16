"""The pruning loop of the ``prune`` stage (Michel et al. 2019), as pure functions (numpy only).

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
  masks ``k`` more heads by the importance under the current mask and measures the perplexity of
  the result; a step whose perplexity exceeds T is rejected and ends the loop, as does a step that
  would leave fewer than ``min_heads`` heads. Returns the **last accepted** mask.

**One measurement per mask.** The loop asks for each mask it visits once, through
``measure(mask, want_importance) -> (perplexity, raw importance or None)``: the perplexity decides
whether the mask is accepted, and, when it is, the importance measured in the same call (the
gradient of that same loss under that same mask: :func:`stages.prune.gated_pass`, one forward and
one backward) chooses the next step's heads. A mask after which no step can follow (``min_heads``)
is measured without importance (a forward only). So step 0 costs one pass, not a forward for P0 and
an importance pass, and each later step one pass, not an importance pass plus a scoring forward;
the masks and perplexities are those of the two-pass loop (tests/test_prune_loop.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Measure = Callable[[np.ndarray, bool], tuple[float, np.ndarray | None]]


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
    measure: Measure,
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

    ``measure(mask, want_importance)`` returns the perplexity with ``mask`` applied and, when
    ``want_importance``, the raw [L, H] importance under ``mask`` (else None). Each mask is measured
    once: the starting mask gives P0 and the first step's importance; each step normalises the
    importance under the current mask, masks ``heads_per_step`` more heads and measures the new
    mask, whose importance (asked for only when another step could follow it) drives the next step
    if the mask is accepted. The loop stops (without taking the step) when the step would leave
    fewer than ``min_heads`` heads, and stops (rejecting the step) when its perplexity is above the
    threshold. ``on_step`` is called for every trajectory point.
    """
    shape = (n_layers, n_heads)
    mask = _start_mask(shape, threshold, min_heads, initial_mask)
    k = heads_per_step(n_layers, n_heads, masking_amount)

    def record(point: PruneStep) -> None:
        trajectory.append(point)
        if on_step is not None:
            on_step(point)

    def measured(m: np.ndarray) -> tuple[float, np.ndarray | None]:
        return _measure_once(measure, m, int(m.sum()) - k >= min_heads)

    trajectory: list[PruneStep] = []
    p0, raw = measured(mask)
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
        if raw is None:  # measured without importance only when no step can follow
            stop_reason = f"min_heads: masking {k} more of {kept} heads would leave fewer than {min_heads}"
            break
        step += 1
        imp = normalize_importance(raw, normalize_layers, normalize_global, mask=mask, over=normalize_over)
        raws.append(raw)
        imps.append(imp)
        candidate = next_mask(mask, imp, k)
        ppl, raw = measured(candidate)
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


def _measure_once(measure: Measure, mask: np.ndarray, want_importance: bool) -> tuple[float, np.ndarray | None]:
    """``measure`` of a copy of ``mask``: the perplexity, and the float64 importance when asked for (shape checked)."""
    ppl, raw = measure(mask.copy(), want_importance)
    if not want_importance:
        return float(ppl), None
    imp = np.asarray(raw, dtype=np.float64)
    if imp.shape != mask.shape:
        raise ValueError(f"measure returned importance of shape {imp.shape}, expected {mask.shape}")
    return float(ppl), imp


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

