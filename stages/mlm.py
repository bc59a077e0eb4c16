"""Masked-LM helpers shared by the model stages (``train``, ``prune``, ``cross_eval``, ``encode``).

Cheap to import: numpy and the standard library at module level, torch/transformers inside the
functions, so that a stage module may import this one at module level.

Data: ``dataset`` artifacts (stage ``tokenize``), read through :mod:`stages.formats.dataset` (``load_split``,
``dataset_languages``: re-exported here). Decisions (best checkpoint, head importance, pruning threshold)
are taken on the ``select`` half of the test documents, reported numbers are measured on ``report``.

Evaluation masking is **deterministic** (docs/methods.md, section 4): :func:`eval_batches` masks chunk
``i`` of language ``lang`` with its own generator seeded by ``(seed, lang, i)`` (numpy's PCG64 via a
``SeedSequence``: stable across numpy and torch versions). The masked positions of a chunk are
therefore the same every time, for every model and every pruning step, whatever the batch size or
the number of chunks evaluated. The scheme is the standard collator's: each non-special token is
selected with probability ``mlm_probability``; a selected token becomes ``<mask>`` with probability
0.8, a random token id with 0.1 and stays unchanged with 0.1; labels are -100 elsewhere.

Training masking uses transformers' ``DataCollatorForLanguageModeling`` (fresh random masks each
step; see ``stages.train``).

Spread: :func:`evaluate_chunks` keeps each chunk's summed loss and masked-token count
(:class:`stages.perplexity.ChunkLosses`), from which a percentile-bootstrap interval of the perplexity
needs no other forward pass (:mod:`stages.perplexity`); the resamples are seeded by
:func:`bootstrap_seed`, ``(eval_seed, language)`` only, so two models evaluated on one language are
resampled identically (paired intervals).

:func:`mlm_loss` runs the vocabulary projection only on the masked positions (about 15% of the
tokens): for XLM-R base the 250k-word projection is the dominant cost of a forward pass, and the
loss is identical to ``model(**batch).loss`` (the LM head works token by token).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from orchestrator.stage import StageParams
from stages.formats.dataset import dataset_languages as dataset_languages
from stages.formats.dataset import load_split
from stages.perplexity import DEFAULT_BOOTSTRAP_RESAMPLES, DEFAULT_INTERVAL_LEVEL, ChunkLosses
from stages.perplexity import bootstrap_perplexity_interval as bootstrap_perplexity_interval

DEFAULT_EVAL_SEED = 1234  # the study's seed (docs/methods.md, Introduction); every stage evaluating perplexity uses it
EvalSplit = Literal["select", "report"]
BOOTSTRAP_WORD = 0x626F6F74  # "boot": a seed word no chunk index reaches, so bootstrap and masks never share a stream


class EvalParams(StageParams):
    """The deterministic-evaluation settings shared by the stages that measure perplexity on the
    test halves (prune, cross_eval): one definition, so their numbers stay comparable."""

    split: EvalSplit = Field(
        "select",
        description="Which half of the test documents to evaluate on: 'select' (decisions: pruning) or 'report' "
        "(reported numbers: cross_eval).",
    )
    eval_batch_size: int = Field(8, ge=1, description="Chunks per evaluation batch.")
    max_eval_chunks: int | None = Field(None, ge=1, description="Use the first N chunks of the half per language; None: all.")
    mlm_probability: float = Field(0.15, gt=0.0, le=1.0, description="Share of tokens masked for evaluation.")
    eval_seed: int = Field(
        DEFAULT_EVAL_SEED,
        description="Seed of the deterministic evaluation masks: keep the train stage's (1234) so that "
        "perplexities of every stage are measured on the same masked positions.",
    )
    bootstrap_resamples: int = Field(
        DEFAULT_BOOTSTRAP_RESAMPLES, ge=10, description="Bootstrap resamples of the eval chunks for perplexity intervals."
    )
    interval_level: float = Field(
        DEFAULT_INTERVAL_LEVEL, gt=0.0, lt=1.0, description="Coverage of the percentile bootstrap intervals."
    )


IGNORE_INDEX = -100
EVAL_KEYS = ("input_ids", "attention_mask", "labels")


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
    """Set torch's intra-op threads to ``n`` or to the CPUs this process may use (SLURM-aware).

    ``OMP_NUM_THREADS`` counts per process; the task's CPUs (``SLURM_CPUS_PER_TASK``, else this
    process's affinity) are shared by the ``LOCAL_WORLD_SIZE`` processes of a job on this node."""
    import torch

    if n is None:
        slurm, omp = os.environ.get("SLURM_CPUS_PER_TASK"), os.environ.get("OMP_NUM_THREADS")
        try:
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
            n = int(slurm) // local if slurm else int(omp) if omp else len(os.sched_getaffinity(0)) // local
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
        words = np.asarray(rng.integers(0, vocab_size, size=width))
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
    split: EvalSplit = "select",
) -> list[dict[str, Any]]:
    """:func:`eval_batches` of the first ``max_chunks`` chunks of one test half of ``lang`` (the
    tokenize stage already drew a seeded subset, so the first ones are a random sample). ``split``:
    ``"select"`` (default; decisions) or ``"report"`` (reported numbers)."""
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


def masked_logits(model: Any, batch: Mapping[str, Any], selected: Any) -> Any:
    """The vocabulary logits at the ``selected`` (masked) positions only, in row-major order."""
    parts = _lm_parts(model)
    if parts is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[selected]
    base, head = parts
    return head(base(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))[0][selected])


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


def masked_positions(labels: Any) -> tuple[Any, Any]:
    """The flat indices (row-major, the order of boolean indexing) of the masked positions of ``labels``
    and their target ids, computed where ``labels`` lives: on the host, before a batch goes to a GPU."""
    flat = labels.reshape(-1)
    positions = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return positions, flat[positions]


def mlm_loss_at(model: Any, input_ids: Any, attention_mask: Any, positions: Any, targets: Any,
                reduction: str = "mean") -> Any:
    """:func:`mlm_loss` with the masked positions given (:func:`masked_positions`, on the model's device):
    the same loss bit for bit, without reading anything back from the device (no count, no boolean
    indexing), so a training step queues on a GPU without waiting for it."""
    import torch
    import torch.nn.functional as F

    parts = _lm_parts(model)
    if parts is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = out.reshape(-1, out.shape[-1]).index_select(0, positions)
    else:
        base, head = parts
        hidden = base(input_ids=input_ids, attention_mask=attention_mask)[0]
        if positions.numel() == 0:
            return hidden.sum() * 0.0
        logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))
    if positions.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, reduction=reduction).to(torch.float32)


def chunk_loss_sums(model: Any, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``batch``: the summed cross-entropy over its masked positions (float64) and their
    count (int64). Same forward pass as :func:`mlm_loss`; call it under ``torch.no_grad()``."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    counts = selected.sum(dim=1)
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    if int(counts.sum()) > 0:
        logits = masked_logits(model, batch, selected)
        token_loss = F.cross_entropy(logits.float(), labels[selected].to(logits.device), reduction="none")
        rows = selected.nonzero()[:, 0].to(sums.device)
        sums.index_add_(0, rows, token_loss.to(device=sums.device, dtype=torch.float64))
    return sums.cpu().numpy(), counts.cpu().numpy().astype(np.int64)


def bootstrap_seed(seed: int, language: str | None = None) -> list[int]:
    """The seed words of a language's bootstrap resamples: ``[seed, crc32(language), "boot"]``."""
    return [*eval_seed(seed, language), BOOTSTRAP_WORD]


def model_device(model: Any) -> Any:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


class EvalStopped(Exception):
    """Raised by :func:`evaluate` when its ``should_stop`` callback says so."""


def evaluate_chunks(
    model: Any,
    batches: Sequence[Mapping[str, Any]],
    *,
    autocast: Callable[[], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ChunkLosses:
    """Every chunk's summed MLM loss over its masked positions and their count, in eval mode and
    without gradients (:class:`ChunkLosses`; ``.summary()`` is :func:`evaluate`'s result).

    Batches are moved to the model's device. ``autocast``: a context-manager factory (e.g.
    ``accelerator.autocast``) for mixed precision. ``should_stop`` is polled between batches and
    raises :class:`EvalStopped`. The model's train/eval mode is restored afterwards.
    """
    import contextlib

    import torch

    device = model_device(model)
    was_training = model.training
    model.eval()
    sums: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for batch in batches:
                if should_stop is not None and should_stop():
                    raise EvalStopped()
                moved = {k: v.to(device) for k, v in batch.items() if k in EVAL_KEYS}
                with autocast() if autocast is not None else contextlib.nullcontext():
                    loss_sum, n = chunk_loss_sums(model, moved)
                sums.append(loss_sum)
                counts.append(n)
    finally:
        model.train(was_training)
    if not sums:
        raise ValueError("evaluate: no batches to evaluate")
    return ChunkLosses(np.concatenate(sums), np.concatenate(counts))


def evaluate(
    model: Any,
    batches: Sequence[Mapping[str, Any]],
    *,
    autocast: Callable[[], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Token-weighted mean MLM loss over every masked position of ``batches``, in eval mode and
    without gradients: ``{"loss", "perplexity" (= exp(loss)), "tokens"}`` (see :func:`evaluate_chunks`)."""
    return evaluate_chunks(model, batches, autocast=autocast, should_stop=should_stop).summary()
