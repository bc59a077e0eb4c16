"""Masked-LM helpers shared by the model stages (``train``, ``prune``, ``cross_eval``, ``encode``).

Cheap to import: numpy and the standard library at module level, torch/transformers inside the
functions, so that a stage module may import this one at module level.

Data: a ``dataset`` artifact (stage ``tokenize``) holds ``<lang>/{train,test}.npy`` (int32
``[n_chunks, block_size]`` token ids, no labels) and ``meta.json``.

Evaluation masking is **deterministic** (docs/methods.md, section 4): :func:`eval_batches` masks chunk
``i`` of language ``lang`` with its own generator seeded by ``(seed, lang, i)`` (numpy's PCG64 via a
``SeedSequence``: stable across numpy and torch versions). The masked positions of a chunk are
therefore the same every time, for every model and every pruning step, whatever the batch size or
the number of chunks evaluated. The scheme is the standard collator's: each non-special token is
selected with probability ``mlm_probability``; a selected token becomes ``<mask>`` with probability
0.8, a random token id with 0.1 and stays unchanged with 0.1; labels are -100 elsewhere.

Training masking uses transformers' ``DataCollatorForLanguageModeling`` (fresh random masks each
step; see ``stages.train``).

:func:`mlm_loss` runs the vocabulary projection only on the masked positions (about 15% of the
tokens): for XLM-R base the 250k-word projection is the dominant cost of a forward pass, and the
loss is identical to ``model(**batch).loss`` (the LM head works token by token).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from orchestrator.stage import StageParams

META_FILE = "meta.json"
DEFAULT_EVAL_SEED = 1234  # the study's seed (docs/methods.md, Introduction); every stage evaluating perplexity uses it


class EvalParams(StageParams):
    """The deterministic-evaluation settings shared by the stages that measure perplexity on the
    test sets (prune, cross_eval): one definition, so their numbers stay comparable."""

    eval_batch_size: int = Field(8, ge=1, description="Chunks per evaluation batch.")
    max_eval_chunks: int | None = Field(None, ge=1, description="Use the first N test chunks per language; None: all.")
    mlm_probability: float = Field(0.15, gt=0.0, le=1.0, description="Share of tokens masked for evaluation.")
    eval_seed: int = Field(
        DEFAULT_EVAL_SEED,
        description="Seed of the deterministic evaluation masks: keep the train stage's (1234) so that "
        "perplexities of every stage are measured on the same masked positions.",
    )


IGNORE_INDEX = -100
EVAL_KEYS = ("input_ids", "attention_mask", "labels")


# --------------------------------------------------------------------------------------------------
# Dataset artifacts
# --------------------------------------------------------------------------------------------------


def read_dataset_meta(dataset_dir: Path) -> dict[str, Any]:
    """The ``meta.json`` of a dataset artifact ({} when absent)."""
    path = Path(dataset_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def dataset_languages(dataset_dir: Path) -> list[str]:
    """The languages of a dataset artifact: ``meta.json``'s order, else the sorted ``<lang>/`` dirs."""
    dataset_dir = Path(dataset_dir)
    langs = read_dataset_meta(dataset_dir).get("languages")
    if isinstance(langs, list) and langs and all(isinstance(x, str) for x in langs):
        return list(langs)
    found = sorted(p.name for p in dataset_dir.iterdir() if p.is_dir() and (p / "train.npy").is_file())
    if not found:
        raise ValueError(f"{dataset_dir} is not a dataset artifact: no <lang>/train.npy inside")
    return found


def load_split(dataset_dir: Path, lang: str, split: str, *, mmap: bool = False) -> np.ndarray:
    """The ``[n_chunks, block_size]`` token ids of one language and split (``mmap``: memory-mapped)."""
    path = Path(dataset_dir) / lang / f"{split}.npy"
    if not path.is_file():
        raise ValueError(f"dataset {dataset_dir} has no {lang}/{split}.npy")
    arr = np.load(path, mmap_mode="r" if mmap else None)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected [n_chunks, block_size], got shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------------
# Models and tokenizers
# --------------------------------------------------------------------------------------------------


def load_tokenizer(path: Path | str) -> Any:
    """A tokenizer artifact (or hub name) loaded with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids never selected for masking: the tokenizer's special tokens (as the standard collator)."""
    return sorted({int(i) for i in tokenizer.all_special_ids})


def build_model(config: Mapping[str, Any], tokenizer_dir: Path | str, block_size: int | None = None) -> Any:
    """A freshly initialised ``XLMRobertaForMaskedLM`` from ``XLMRobertaConfig(**config)``.

    ``vocab_size`` and the pad/bos/eos ids come from the tokenizer (they override ``config``).
    ``max_position_embeddings`` defaults to the longest input plus ``pad_token_id + 1`` (RoBERTa
    positions start after the pad id: 514 for 512 tokens and pad 1, as XLM-R). Initialisation uses
    torch's global RNG: seed it first.
    """
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    tok = load_tokenizer(tokenizer_dir)
    cfg = dict(config)
    cfg["vocab_size"] = len(tok)
    for name in ("pad", "bos", "eos"):
        tid = getattr(tok, f"{name}_token_id", None)
        if tid is not None:
            cfg[f"{name}_token_id"] = int(tid)
    pad = int(cfg.get("pad_token_id", 1))
    longest = block_size or min(int(getattr(tok, "model_max_length", 512) or 512), 4096)
    cfg.setdefault("max_position_embeddings", longest + pad + 1)
    cfg.setdefault("type_vocab_size", 1)  # as XLM-R
    return XLMRobertaForMaskedLM(XLMRobertaConfig(**cfg))


def load_model(path: Path | str, **kwargs: Any) -> Any:
    """A masked-LM checkpoint: a local directory (``save_pretrained``) or a hub name (real runs)."""
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(str(path), **kwargs)


def check_model_fits(model: Any, block_size: int, max_token_id: int | None = None) -> None:
    """Raise a clear error when the data cannot go through the model (vocabulary, positions)."""
    cfg = model.config
    if max_token_id is not None and max_token_id >= cfg.vocab_size:
        raise ValueError(f"token id {max_token_id} is outside the model's vocabulary ({cfg.vocab_size})")
    pad = getattr(cfg, "pad_token_id", None) or 0
    need = block_size + pad + 1
    if getattr(cfg, "max_position_embeddings", need) < need:
        raise ValueError(
            f"block_size {block_size} needs max_position_embeddings >= {need} (positions start after the "
            f"pad id {pad}); the model has {cfg.max_position_embeddings}"
        )


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` or to the CPUs this process may use (SLURM-aware)."""
    import torch

    if n is None:
        env = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("OMP_NUM_THREADS")
        try:
            n = int(env) if env else len(os.sched_getaffinity(0))
        except (AttributeError, ValueError):
            n = os.cpu_count() or 1
    n = max(1, n)
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------------------
# Deterministic evaluation masking
# --------------------------------------------------------------------------------------------------


def eval_seed(seed: int, language: str | None = None) -> list[int]:
    """The seed words of a language's evaluation masks: ``[seed, crc32(language)]``."""
    return [int(seed) & 0xFFFFFFFF, zlib.crc32((language or "").encode("utf-8"))]


def mask_chunks(
    chunks: np.ndarray,
    mask_token_id: int,
    special_ids: Iterable[int],
    vocab_size: int,
    seed: int,
    *,
    language: str | None = None,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically masked ``(input_ids, labels)`` (int64) of ``chunks``; row ``i`` uses the
    generator ``SeedSequence([seed, crc32(language), start + i])``."""
    ids = np.asarray(chunks, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"chunks must be [n, block_size], got shape {ids.shape}")
    if not 0.0 <= mlm_probability <= 1.0 or mask_replace_prob + random_replace_prob > 1.0:
        raise ValueError("invalid masking probabilities")
    special = np.isin(ids, np.asarray(sorted(set(special_ids)), dtype=np.int64))
    keep_random = random_replace_prob / (1.0 - mask_replace_prob) if mask_replace_prob < 1 else 0.0
    inputs = ids.copy()
    labels = np.full_like(ids, IGNORE_INDEX)
    base = eval_seed(seed, language)
    width = ids.shape[1]
    for i in range(ids.shape[0]):
        rng = np.random.default_rng(np.random.SeedSequence([*base, start + i]))
        u = rng.random((3, width))
        words = rng.integers(0, vocab_size, size=width)
        masked = (u[0] < mlm_probability) & ~special[i]
        replaced = masked & (u[1] < mask_replace_prob)
        randomised = masked & ~replaced & (u[2] < keep_random)
        labels[i, masked] = ids[i, masked]
        inputs[i, replaced] = mask_token_id
        inputs[i, randomised] = words[randomised]
    return inputs, labels


def eval_batches(
    chunks: np.ndarray,
    mask_token_id: int,
    special_ids: Iterable[int],
    vocab_size: int,
    batch_size: int,
    seed: int,
    mlm_probability: float = 0.15,
    *,
    language: str | None = None,
    pad_token_id: int | None = None,
) -> list[dict[str, Any]]:
    """Deterministically masked evaluation batches: dicts of CPU tensors ``input_ids``,
    ``attention_mask`` (0 on ``pad_token_id``), ``labels`` (-100 = not predicted).

    The masks depend only on ``(seed, language, chunk index)`` (see :func:`mask_chunks`), never on
    ``batch_size`` or on how many chunks are evaluated.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = np.asarray(chunks)
    inputs, labels = mask_chunks(
        ids, mask_token_id, special_ids, vocab_size, seed, language=language, mlm_probability=mlm_probability
    )
    attention = np.ones_like(inputs) if pad_token_id is None else (ids != pad_token_id).astype(np.int64)
    batches = []
    for lo in range(0, len(inputs), batch_size):
        sl = slice(lo, lo + batch_size)
        batches.append(
            {
                "input_ids": torch.from_numpy(inputs[sl].copy()),
                "attention_mask": torch.from_numpy(attention[sl].copy()),
                "labels": torch.from_numpy(labels[sl].copy()),
            }
        )
    return batches


def language_eval_batches(
    dataset_dir: Path,
    lang: str,
    tokenizer: Any,
    batch_size: int,
    seed: int = DEFAULT_EVAL_SEED,
    *,
    max_chunks: int | None = None,
    mlm_probability: float = 0.15,
    split: str = "test",
) -> list[dict[str, Any]]:
    """:func:`eval_batches` of the first ``max_chunks`` test chunks of ``lang`` (the tokenize stage
    already drew a seeded subset, so the first ones are a random sample)."""
    chunks = load_split(dataset_dir, lang, split)
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    return eval_batches(
        chunks,
        tokenizer.mask_token_id,
        special_token_ids(tokenizer),
        len(tokenizer),
        batch_size,
        seed,
        mlm_probability,
        language=lang,
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------------------------------
# Loss and evaluation
# --------------------------------------------------------------------------------------------------


def _lm_parts(model: Any) -> tuple[Any, Any] | None:
    """(encoder, LM head) of a masked LM whose head works token by token, else None."""
    base = getattr(model, "base_model", None)
    head = getattr(model, "lm_head", None) or getattr(model, "cls", None)
    if base is None or head is None or base is model:
        return None
    return base, head


def mlm_loss(model: Any, batch: Mapping[str, Any], reduction: str = "mean") -> tuple[Any, int]:
    """Cross-entropy over the masked positions (``labels != -100``) and their count.

    ``reduction``: "mean" (the loss ``model(**batch).loss`` gives) or "sum". The vocabulary
    projection runs on the masked positions only. A batch without masked tokens gives a zero loss
    that still depends on the parameters (so ``backward`` works).
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    parts = _lm_parts(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        logits = logits[selected]
    else:
        base, head = parts
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))[0]
        if n == 0:
            return hidden.sum() * 0.0, 0
        logits = head(hidden[selected])
    if n == 0:
        return logits.sum() * 0.0, 0
    loss = F.cross_entropy(logits.float(), labels[selected].to(logits.device), reduction=reduction)
    return loss.to(torch.float32), n


def model_device(model: Any) -> Any:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


class EvalStopped(Exception):
    """Raised by :func:`evaluate` when its ``should_stop`` callback says so."""


def evaluate(
    model: Any,
    batches: Sequence[Mapping[str, Any]],
    *,
    autocast: Callable[[], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Token-weighted mean MLM loss over every masked position of ``batches``, in eval mode and
    without gradients: ``{"loss", "perplexity" (= exp(loss)), "tokens"}``.

    Batches are moved to the model's device. ``autocast``: a context-manager factory (e.g.
    ``accelerator.autocast``) for mixed precision. ``should_stop`` is polled between batches and
    raises :class:`EvalStopped`. The model's train/eval mode is restored afterwards.
    """
    import contextlib

    import torch

    device = model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if should_stop is not None and should_stop():
                    raise EvalStopped()
                moved = {k: v.to(device) for k, v in batch.items() if k in EVAL_KEYS}
                with autocast() if autocast is not None else contextlib.nullcontext():
                    loss, n = mlm_loss(model, moved, reduction="sum")
                total += float(loss)
                tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate: the batches contain no masked tokens")
    mean = total / tokens
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf, "tokens": float(tokens)}
