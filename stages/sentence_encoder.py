"""Pooled hidden states of sentences: what stage ``encode`` runs for each language, and the benchmark too.

Encoding: the sentences of a language are tokenized (the model's tokenizer, its special tokens,
truncation to ``max_length`` tokens), sorted by token count (longest first), cut into batches of at
most ``batch_size`` sentences and at most ``batch_size`` x the mean length padded positions (so the
long tail goes in smaller batches), padded to the batch's longest sentence, run through the encoder
(the masked-LM head is not computed) with ``output_hidden_states=True`` and no gradients, on CUDA
when available, and written back in the corpus order. Every hidden state is kept: the embeddings
output (layer 0) and each layer's output.

Length limit: ``max_length=None`` (the default) is the model's own limit: the positions its position
embeddings hold (RoBERTa-style models lose ``pad_token_id + 1`` of them to the offset of their
position ids) and the tokenizer's ``model_max_length``, whichever is smaller; an int is clamped to
that limit. A parallel sentence cut by the limit is no longer the translation of its partner, so
every sentence is first tokenized without truncation: a sentence counts as truncated when that true
token count exceeds the limit (one of exactly ``max_length`` tokens is not cut), and the counts per
language are stored (``truncated``). Only the cut sentences are tokenized again with truncation
(the tokenizer keeps ``<s>`` and ``</s>`` and drops the sentence's last tokens).

Pooling: the mean over the sentence's tokens weighted by the attention mask (padding excluded).
By default the template tokens ``<s>`` and ``</s>`` (cls/sep/bos/eos ids) are excluded too
(``include_special_tokens=False``): they are the same symbols in every language and at layer 0 their
embeddings are identical across languages, which would add spurious cross-language similarity. A
sentence with no other token falls back to all its attended tokens.

Cheap to import: torch and numpy are imported inside the functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.stage import StageInterrupted

# --------------------------------------------------------------------------------------------------
# Tokens and batches (pure)
# --------------------------------------------------------------------------------------------------


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_positions: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length: longest first, ties in input order.

    A batch holds at most ``batch_size`` sentences and, with ``max_positions``, at most that many
    padded positions (sentences x its longest), but always at least one sentence: the long tail of
    the length distribution, where neighbours differ most, then goes in smaller batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch is None or len(batch) >= batch_size or (
            max_positions is not None and (len(batch) + 1) * lengths[batch[0]] > max_positions  # [0]: its longest
        ):
            batches.append([i])
        else:
            batch.append(i)
    return batches


def in_order_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive indices in batches of ``batch_size`` (what encoding without sorting does)."""
    return [list(range(lo, min(lo + batch_size, n))) for lo in range(0, n, batch_size)]


def position_budget(lengths: Sequence[int], batch_size: int) -> int:
    """Padded positions allowed per batch: ``batch_size`` sentences of the mean length (rounded up).

    Measured on 7 x 500 Bible verses (the demo), batch 32: padding 6.8% without a budget, 4.4% with it.
    """
    return batch_size * max(1, math.ceil(sum(lengths) / max(1, len(lengths))))


def encode_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool = True) -> list[list[int]]:
    """The batches ``encode_sentences`` runs for sentences of ``lengths`` tokens: length-sorted
    within the :func:`position_budget`, or (``sort_by_length=False``) in order."""
    if sort_by_length:
        return length_sorted_batches(lengths, batch_size, position_budget(lengths, batch_size))
    return in_order_batches(len(lengths), batch_size)


def pooling_description(include_special_tokens: bool) -> str:
    what = "all attended tokens (<s> and </s> included)" if include_special_tokens else (
        "attended tokens except <s>/</s> (cls/sep/bos/eos ids)")
    return f"mean over {what}; padding excluded"


def position_limits(model: Any, tokenizer: Any) -> list[int]:
    """The input lengths the model and tokenizer state they accept: the positions the model can embed
    (RoBERTa-style position ids start after the pad id, so pad id + 1 positions are never used) and the
    tokenizer's ``model_max_length`` (ignored when it is the "no limit" sentinel)."""
    cfg = model.config
    limits: list[int] = []
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos:
        offset = (getattr(cfg, "pad_token_id", None) or 0) + 1 if cfg.model_type in ("xlm-roberta", "roberta") else 0
        limits.append(int(max_pos) - offset)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return limits


def effective_max_length(model: Any, tokenizer: Any, requested: int | None) -> int:
    """``requested`` clamped to :func:`position_limits`; ``None``: the smallest of those limits."""
    limits = position_limits(model, tokenizer)
    if requested is None:
        if not limits:
            raise ValueError("encode: the model states no position limit; set max_length")
        return max(2, min(limits))
    return max(2, min([requested, *limits]))


@dataclass(frozen=True)
class Tokenized:
    """Token ids of some sentences, truncated to a limit, and their token counts before truncation."""

    ids: list[list[int]]  # special tokens included, at most max_length each
    untruncated: list[int]  # token count of each sentence without truncation (special tokens included)

    @property
    def lengths(self) -> list[int]:
        """Token count of each sentence as encoded."""
        return [len(x) for x in self.ids]

    @property
    def truncated(self) -> int:
        """How many sentences lost tokens to the limit."""
        return sum(full > len(x) for x, full in zip(self.ids, self.untruncated, strict=True))


def tokenize_sentences(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tokenized:
    """Tokenize ``texts`` (special tokens added) and truncate those longer than ``max_length`` tokens.

    Every sentence is first tokenized without truncation, which gives its true token count; only the
    sentences over the limit are tokenized again with the tokenizer's own truncation (which keeps the
    special tokens). A sentence of exactly ``max_length`` tokens is therefore not counted as cut.
    """
    texts = list(texts)
    full = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    ids: list[list[int]] = [list(x) for x in full]
    cut = [i for i, x in enumerate(ids) if len(x) > max_length]
    if cut:
        short = tokenizer([texts[i] for i in cut], add_special_tokens=True, truncation=True, max_length=max_length,
                          verbose=False)["input_ids"]
        for i, x in zip(cut, short, strict=True):
            ids[i] = list(x)
    if any(len(x) == 0 for x in ids):
        raise ValueError("encode: a sentence tokenizes to no token at all; drop empty sentences from the corpus")
    return Tokenized(ids, [len(x) for x in full])


def template_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the template tokens excluded from pooling: cls/sep/bos/eos (never pad, unk or mask)."""
    ids = {getattr(tokenizer, f"{n}_token_id", None) for n in ("cls", "sep", "bos", "eos")}
    return sorted(int(i) for i in ids if i is not None)

# --------------------------------------------------------------------------------------------------
# Encoding (torch, imported lazily)
# --------------------------------------------------------------------------------------------------


def encode_sentences(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    include_special_tokens: bool = False,
    device: Any = None,
    should_stop: Callable[[], bool] | None = None,
    sort_by_length: bool = True,
    tokenized: Tokenized | None = None,
) -> tuple[Any, dict[str, float]]:
    """Pooled hidden states of ``texts``: float32 numpy ``[layers + 1, len(texts), hidden]``.

    ``model`` is a masked LM or a bare encoder; its ``base_model`` (the encoder) is run. Batches are
    sorted by token count, with at most :func:`position_budget` padded positions each
    (``sort_by_length=False``: consecutive ``texts`` in their order, which only the benchmark uses),
    and the result is in the order of ``texts``. ``max_length``: see :func:`effective_max_length`
    (None: the model's limit). ``tokenized``: the output of :func:`tokenize_sentences` for ``texts``
    at that limit, when the caller already has it. Returns the array and stats (``tokens``,
    ``padded_positions``, ``positions``, ``padding_fraction``, ``at_max_length``, ``truncated``,
    ``max_length``, ``seconds``).
    """
    import numpy as np
    import torch

    encoder = getattr(model, "base_model", model)
    if device is None:
        device = next(model.parameters()).device
    max_length = effective_max_length(model, tokenizer, max_length)
    if tokenized is None:
        tokenized = tokenize_sentences(tokenizer, texts, max_length)
    if len(tokenized.ids) != len(texts) or max(tokenized.lengths, default=0) > max_length:
        raise ValueError("encode_sentences: 'tokenized' does not hold these texts at this max_length; "
                         "pass tokenize_sentences(tokenizer, texts, max_length)")
    ids = tokenized.ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = torch.tensor(template_token_ids(tokenizer) if not include_special_tokens else [], dtype=torch.long)
    n_layers = int(model.config.num_hidden_layers)
    hidden = int(model.config.hidden_size)
    out = np.zeros((n_layers + 1, len(ids), hidden), dtype=np.float32)
    padded = positions = 0
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in encode_batches([len(x) for x in ids], batch_size, sort_by_length):
                if should_stop is not None and should_stop():
                    raise StageInterrupted("encode: stop requested (nothing to checkpoint, the stage reruns)")
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                    attention[row, : len(ids[i])] = 1
                padded += int((attention == 0).sum())
                positions += attention.numel()
                weights = attention.clone()
                if special.numel():
                    weights = weights * ~torch.isin(input_ids, special)
                    empty = weights.sum(1) == 0
                    weights[empty] = attention[empty]  # only template tokens: pool over them
                w = weights.to(device=device, dtype=torch.float32)
                counts = w.sum(1, keepdim=True)
                states = encoder(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), output_hidden_states=True
                ).hidden_states
                if len(states) != n_layers + 1:
                    raise ValueError(f"encoder returned {len(states)} hidden states, expected {n_layers + 1}")
                idx = np.asarray(batch)
                for layer, h in enumerate(states):
                    pooled = torch.einsum("bth,bt->bh", h.float(), w) / counts
                    out[layer, idx] = pooled.cpu().numpy()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    stats = {
        "tokens": float(sum(len(x) for x in ids)),
        "padded_positions": float(padded),
        "positions": float(positions),
        "padding_fraction": padded / positions if positions else 0.0,
        "at_max_length": float(sum(len(x) >= max_length for x in ids)),
        "truncated": float(tokenized.truncated),
        "max_length": float(max_length),
        "seconds": seconds,
    }
    return out, stats
