"""Head masks (artifact type ``head-mask``): written by ``prune``; read by ``cross_eval``, ``mask_stats``,
``encode`` (variant ``subnetwork``), ``report`` and ``sweep_summary``.

Layout::

    mask.npy            float32 [L, H], 1 = head kept, 0 = head masked (the last accepted mask)
    mask.json           {"language", "mask" (nested list), "heads_kept", "total_heads", "num_layers",
                         "num_heads", "hidden_size", "num_parameters", "threshold", "eval_split", ...}
    importance.npy      float32 [steps, L, H]: the normalised importance that chose each step's heads
                        (masked heads 0); step i was computed under the mask before step i
    importance_raw.npy  float32 [steps, L, H]: the same before normalisation
    trajectory.json     [{"step", "heads_kept", "perplexity", "accepted"}, ...]; step 0 = start mask

A mask's language is the producing job's matrix point, else mask.json's, else the artifact metadata's
(:func:`mask_language`). ``full`` is not a language: it names the unpruned model's row of cross_eval.json.

(The subnetwork directories of :func:`stages.gating.save_subnetwork` carry their own ``head_mask.npy``; they
are a model, not a ``head-mask`` artifact.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.stage import Inputs, ResolvedInput
from stages._io import read_json, write_json
from stages.formats.names import FULL

if TYPE_CHECKING:
    import numpy as np

MASK_NPY = "mask.npy"
MASK_JSON = "mask.json"
IMPORTANCE_NPY = "importance.npy"
IMPORTANCE_RAW_NPY = "importance_raw.npy"
TRAJECTORY_JSON = "trajectory.json"

MaskInput = tuple[str, "np.ndarray", dict[str, Any]]  # (language, mask [L, H], mask.json)


def write_mask_dir(
    out: Path,
    mask: Any,
    importances: Any,
    raw_importances: Any,
    trajectory: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any],
) -> dict[str, Any]:
    """Write a ``head-mask`` artifact (layout in the module docstring); return the mask.json dict
    (``info`` plus the mask and its shape and counts)."""
    import numpy as np

    arr = np.asarray(mask, dtype=np.float32)
    np.save(out / MASK_NPY, arr)
    np.save(out / IMPORTANCE_NPY, np.asarray(importances, dtype=np.float32))
    np.save(out / IMPORTANCE_RAW_NPY, np.asarray(raw_importances, dtype=np.float32))
    write_json(out / TRAJECTORY_JSON, list(trajectory))
    doc = {**info, **mask_summary(arr)}
    write_json(out / MASK_JSON, doc)
    return doc


def read_mask_dir(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The mask (float32 [L, H]) and the mask.json dict of a ``head-mask`` artifact directory."""
    import numpy as np

    path = Path(path)
    info = read_json(path / MASK_JSON) if (path / MASK_JSON).is_file() else {}
    if (path / MASK_NPY).is_file():
        mask = np.asarray(np.load(path / MASK_NPY), dtype=np.float32)
    elif "mask" in info:
        mask = np.asarray(info["mask"], dtype=np.float32)
    else:
        raise ValueError(f"{path} is not a head-mask artifact: no {MASK_NPY} or {MASK_JSON} with a mask")
    if mask.ndim != 2:
        raise ValueError(f"{path}: head mask must be [layers, heads], got shape {mask.shape}")
    return mask, info


def read_mask_info(path: Path) -> dict[str, Any]:
    """The mask.json of a ``head-mask`` artifact directory (which must have one)."""
    info: dict[str, Any] = read_json(Path(path) / MASK_JSON)
    return info


def read_trajectory(path: Path) -> list[dict[str, Any]] | None:
    """trajectory.json of a ``head-mask`` artifact directory; None when it has none."""
    file = Path(path) / TRAJECTORY_JSON
    return read_json(file) if file.is_file() else None


def mask_language(item: ResolvedInput, info: Mapping[str, Any]) -> str:
    """The language of a head mask: the producing job's matrix point, else mask.json (``info``), else the
    artifact metadata; an error when none says it."""
    lang = item.point.get("language") or info.get("language") or item.metadata.get("language")
    if not lang:
        raise ValueError(f"head mask {item.ref} does not say its language (matrix point, mask.json, metadata)")
    return str(lang)


def mask_inputs(inputs: Inputs, name: str = "masks") -> list[MaskInput]:
    """``(language, mask, mask.json)`` of every ``head-mask`` input, in input order.

    The language comes from :func:`mask_language`. Two masks of the same language, a mask named
    ``full`` and masks of different shapes are errors.
    """
    value = inputs.get(name)
    if value is None:
        raise ValueError(f"input {name!r} is missing: connect the head-mask artifacts (one per language)")
    items: list[ResolvedInput] = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"input {name!r} is empty: no head-mask artifact")
    out: list[MaskInput] = []
    for inp in items:
        mask, info = read_mask_dir(inp.path)
        lang = mask_language(inp, info)
        if any(lang == seen for seen, _, _ in out):
            raise ValueError(f"two head masks for language {lang!r} (the second is {inp.ref})")
        if lang == FULL:
            raise ValueError(f"a head mask may not be named {FULL!r}: the name of the unpruned model's row")
        out.append((lang, mask, info))
    shapes = {m.shape for _, m, _ in out}
    if len(shapes) != 1:
        raise ValueError(f"head masks have different shapes: {sorted(shapes)}")
    return out


def mask_summary(arr: np.ndarray) -> dict[str, Any]:
    """The mask as JSON, its shape and how many heads it keeps: what every mask's .json holds."""
    return {
        "mask": arr.tolist(),
        "num_layers": int(arr.shape[0]),
        "num_heads": int(arr.shape[1]),
        "heads_kept": int((arr > 0.5).sum()),
        "total_heads": int(arr.size),
    }
