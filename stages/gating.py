"""Attention-head gates and subnetworks for transformers 5.x encoders (XLM-R, BERT, RoBERTa).

Why forward pre-hooks on the attention output projection, and not ``head_mask``:

- transformers 5.x dropped ``head_mask`` from the encoders' forward paths: ``model(...,
  head_mask=m)`` is accepted through ``**kwargs`` and **silently ignored**, so run_bertology-style
  gating computes the full model without any error. ``prune_heads`` is gone as well.
- Every attention implementation (eager, sdpa, flash, flex) returns the per-head context vectors
  transposed to ``[batch, tokens, heads, head_dim]`` and flattened to ``[batch, tokens, hidden]``
  right before the self-output projection (``layer.attention.output.dense`` in XLM-R/BERT). The
  input of that ``nn.Linear`` is the one place where head ``h`` of the layer is exactly the slice
  ``[..., h*head_dim:(h+1)*head_dim]``, whatever kernel computed it. A forward pre-hook there
  reshapes the input to ``[batch, tokens, heads, head_dim]`` and multiplies it by the layer's gates:
  this is Michel et al.'s "gate on each head's output before the output projection", gradients to
  the gates included, without patching transformers' code.
- The hook's effect is linear in the gate, so a 0/1 mask is exactly reproduced by zeroing the
  projection's **input columns** of the masked heads (``W[:, h*d:(h+1)*d] = 0``, bias kept):
  :func:`save_subnetwork` stores such a copy, with unchanged shapes, so it reloads with plain
  ``from_pretrained`` and needs no hook. Physically removing heads (``prune_heads``) changed the
  shapes, which the config cannot describe, and broke reloading.

Gates are a float tensor ``[layers, heads]``, 1 = head kept, 0 = head masked (also fractional
values and ``requires_grad`` for head-importance gradients ``|dL/dg|``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from stages.formats.masks import mask_summary

MASK_JSON = "head_mask.json"  # a saved subnetwork's own copy of its mask (a head-mask artifact has mask.json)
MASK_NPY = "head_mask.npy"
_PROJECTION_RE = re.compile(r"(?:^|\.)layers?\.(\d+)\.attention\.output\.dense$")


def attention_output_projections(model: Any) -> list[Any]:
    """The self-attention output projection (``nn.Linear``) of every layer, in layer order.

    Found by module name (``...layer.<i>.attention.output.dense``, as XLM-R, BERT and RoBERTa name
    it; cross-attention is excluded); raises when the count differs from ``num_hidden_layers``.
    """
    import torch

    found: dict[int, Any] = {}
    for name, module in model.named_modules():
        m = _PROJECTION_RE.search(name)
        if m and isinstance(module, torch.nn.Linear):
            idx = int(m.group(1))
            if idx in found:
                raise ValueError(f"two attention output projections for layer {idx} (nested models?)")
            found[idx] = module
    n_layers = int(model.config.num_hidden_layers)
    if sorted(found) != list(range(n_layers)):
        raise ValueError(
            f"found attention output projections for layers {sorted(found)} but the model has {n_layers} "
            f"layers; {type(model).__name__} is not an XLM-R/BERT-style encoder"
        )
    return [found[i] for i in range(n_layers)]


def gate_shape(model: Any) -> tuple[int, int]:
    """``(layers, heads)`` of a model's attention."""
    return int(model.config.num_hidden_layers), int(model.config.num_attention_heads)


def _as_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    arr = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape != shape:
        raise ValueError(f"head mask shape {arr.shape} does not match the model's (layers, heads) {shape}")
    return arr


class HeadGates:
    """Gates ``[layers, heads]`` multiplied into each head's attention output.

    ``HeadGates(model, values=None, requires_grad=False)`` attaches one forward pre-hook per layer on
    the attention output projection; ``gates.gates`` is the leaf tensor the hooks read (on the
    model's device, float32), so assigning values in place (:meth:`set`) or backpropagating into it
    takes effect at once. :meth:`remove` detaches the hooks; the object is also a context manager::

        with HeadGates(model, mask) as g:
            logits = model(**batch).logits
    """

    def __init__(self, model: Any, values: Any = None, requires_grad: bool = False) -> None:
        import torch

        self.model = model
        self.projections = attention_output_projections(model)
        self.shape = gate_shape(model)
        hidden = int(model.config.hidden_size)
        if hidden % self.shape[1]:
            raise ValueError(f"hidden size {hidden} is not a multiple of {self.shape[1]} heads")
        self.head_dim = hidden // self.shape[1]
        device = self.projections[0].weight.device
        init = np.ones(self.shape, np.float32) if values is None else _as_mask(values, self.shape)
        self.gates = torch.tensor(init, dtype=torch.float32, device=device, requires_grad=requires_grad)
        self._handles = [
            proj.register_forward_pre_hook(self._hook(i)) for i, proj in enumerate(self.projections)
        ]

    def _hook(self, layer: int) -> Any:
        n_heads, head_dim = self.shape[1], self.head_dim

        def pre_hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            if x.shape[-1] != n_heads * head_dim:
                raise ValueError(f"layer {layer}: projection input has {x.shape[-1]} features, "
                                 f"expected {n_heads} heads x {head_dim}")
            g = self.gates[layer].to(device=x.device, dtype=x.dtype)
            gated = (x.reshape(*x.shape[:-1], n_heads, head_dim) * g[:, None]).reshape(x.shape)
            return (gated, *args[1:])

        return pre_hook

    def set(self, values: Any) -> None:
        """Copy ``values`` ([layers, heads]) into the gates in place (hooks read them at once)."""
        import torch

        arr = _as_mask(values, self.shape)
        with torch.no_grad():
            self.gates.copy_(torch.from_numpy(arr).to(self.gates.device))

    def mask(self) -> np.ndarray:
        """The current gate values as a float32 numpy array."""
        return self.gates.detach().cpu().numpy().astype(np.float32)

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> HeadGates:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def gate_heads(model: Any, values: Any = None, requires_grad: bool = False) -> HeadGates:
    """Attach :class:`HeadGates` to ``model`` (usable as ``with gate_heads(model, mask): ...``)."""
    return HeadGates(model, values, requires_grad)


def apply_mask_(model: Any, mask: Any) -> np.ndarray:
    """Zero, in place, the output-projection input columns of every masked head (mask 0).

    Fractional mask values scale the columns (the same function the gates compute). Returns the
    mask as float32 [layers, heads].
    """
    import torch

    shape = gate_shape(model)
    arr = _as_mask(mask, shape)
    projections = attention_output_projections(model)
    head_dim = int(model.config.hidden_size) // shape[1]
    with torch.no_grad():
        for layer, proj in enumerate(projections):
            scale = torch.from_numpy(np.repeat(arr[layer], head_dim)).to(proj.weight)
            proj.weight.mul_(scale[None, :])
    return arr


def save_subnetwork(model: Any, mask: Any, out_dir: Path | str, tokenizer: Any = None) -> Path:
    """Save ``model`` with the heads masked by ``mask`` removed functionally, plus the mask.

    The saved weights are the model's with the output-projection input columns of masked heads
    zeroed (shapes unchanged): ``from_pretrained(out_dir)`` gives, without any hook, the logits of
    ``model`` gated by ``mask``. The model itself is left unchanged (its columns are restored).
    Also writes ``head_mask.npy`` (float32 [layers, heads], 1 = kept) and ``head_mask.json``, and
    the tokenizer when given. Hooks attached to ``model`` are not saved.
    """
    import torch

    shape = gate_shape(model)
    arr = _as_mask(mask, shape)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("save_subnetwork: the mask must be 0/1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    projections = attention_output_projections(model)
    saved = [p.weight.detach().clone() for p in projections]
    try:
        apply_mask_(model, arr)
        model.save_pretrained(str(out))
    finally:
        with torch.no_grad():
            for p, w in zip(projections, saved, strict=True):
                p.weight.copy_(w)
    write_head_mask(out, arr)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def write_head_mask(out_dir: Path | str, mask: Any, **extra: Any) -> None:
    """Write ``head_mask.npy`` and ``head_mask.json`` (mask, shape, heads kept, ``extra``)."""
    import json

    out = Path(out_dir)
    arr = np.asarray(mask, dtype=np.float32)
    np.save(out / MASK_NPY, arr)
    info = {**mask_summary(arr), **extra}
    (out / MASK_JSON).write_text(json.dumps(info, sort_keys=True, indent=2) + "\n", encoding="utf-8")


