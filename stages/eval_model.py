"""The model side of the stages that evaluate a model on a test half (``prune``, ``cross_eval``).

The model of a ``model`` artifact in eval mode on the job's device (:func:`load_eval_model`), its
tokenizer, or a stand-in built from the dataset's recorded ids when the model has none
(:func:`eval_tokenizer`), the model's shape facts that head masks record (:func:`model_facts`), and the
deterministically masked batches of one test half, checked against the model (:func:`eval_batches_for`).
Cheap to import: numpy and the standard library at module level, torch/transformers inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stages.formats.dataset import load_split, read_dataset_meta
from stages.mlm import EvalSplit, check_model_fits, configure_threads, language_eval_batches, load_model, load_tokenizer


def eval_tokenizer(model_dir: Path, dataset_dir: Path) -> Any:
    """The tokenizer saved with the model; else a stand-in built from the dataset's meta.json ids
    (everything :func:`stages.mlm.language_eval_batches` needs)."""
    try:
        return load_tokenizer(model_dir)
    except (OSError, ValueError, TypeError) as e:
        meta = read_dataset_meta(dataset_dir)
        if meta.get("mask_token_id") is None or meta.get("vocab_size") is None:
            raise ValueError(
                f"cannot load a tokenizer from the model {model_dir} ({e}) and the dataset's meta.json has no "
                "mask_token_id/vocab_size to mask with"
            ) from e
        return _MetaTokenizer(meta)


class _MetaTokenizer:
    """The ids of a tokenizer as recorded in a dataset's meta.json."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.mask_token_id = int(meta["mask_token_id"])
        self.pad_token_id = meta.get("pad_token_id")
        names = ("pad", "mask", "bos", "eos", "unk", "cls", "sep")
        ids = (meta.get(f"{n}_token_id") for n in names)
        self.all_special_ids = sorted({int(i) for i in ids if i is not None})
        self._len = int(meta["vocab_size"])

    def __len__(self) -> int:
        return self._len


def load_eval_model(model_dir: Path, gpus: int = 0, job_label: str = "") -> tuple[Any, Any]:
    """The model of a ``model`` artifact in eval mode on the best device, and that device (checked
    against the ``gpus`` the job asked for and named in the job log: ``stages.device``)."""
    from stages.device import pick_device

    configure_threads()
    device = pick_device(gpus, job_label)
    model = load_model(model_dir).to(device)
    model.eval()
    return model, device


def count_parameters(model: Any) -> int:
    """Number of parameters of a model (tied weights counted once)."""
    return int(sum(p.numel() for p in model.parameters()))


def model_facts(model: Any) -> dict[str, Any]:
    """Shape facts of a model that downstream stages (mask_stats) need."""
    cfg = model.config
    return {
        "num_layers": int(cfg.num_hidden_layers),
        "num_heads": int(cfg.num_attention_heads),
        "hidden_size": int(cfg.hidden_size),
        "num_parameters": count_parameters(model),
    }


def eval_batches_for(
    dataset_dir: Path,
    lang: str,
    tokenizer: Any,
    model: Any,
    batch_size: int,
    seed: int,
    max_chunks: int | None,
    mlm_probability: float,
    split: EvalSplit,
) -> list[dict[str, Any]]:
    """Deterministically masked batches of one test half (``split``) of ``lang``, checked against
    the model's shapes."""
    chunks = load_split(dataset_dir, lang, split)
    if len(chunks) == 0:
        raise ValueError(f"dataset {dataset_dir} has no {lang} {split} chunks; re-run the tokenize stage with more test text")
    used = chunks if max_chunks is None else chunks[:max_chunks]
    check_model_fits(model, int(chunks.shape[1]), int(np.max(used)))
    return language_eval_batches(
        dataset_dir,
        lang,
        tokenizer,
        batch_size,
        seed,
        max_chunks=max_chunks,
        mlm_probability=mlm_probability,
        split=split,
    )
