"""Stage ``encode``: every hidden state of a model for every sentence of a parallel corpus (docs/methods.md 9).

Variants (``variant``), each encoding **every** language's sentences:

- ``full``: the input ``model`` as it is.
- ``subnetwork``: the input model with the head mask of one language (input ``mask``, a
  ``head-mask`` artifact) applied as fixed gates (:class:`stages.gating.HeadGates`: each head's
  attention output multiplied by its 0/1 gate before the output projection). ``language`` names
  the mask's language (taken from the mask's ``mask.json`` when not set; both must agree).
- ``base``: ``base_model`` (a hub name or local path, with its own tokenizer when it has one) when
  set, else the input model, labelled ``base`` (a spec wires the pre-training model to ``model``).
- ``random``: a model of the input model's config, randomly initialised with the seed (``seed``,
  default the job's), in eval mode: the control of what architecture and tokenisation alone give.

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

Output ``encodings`` (type ``encodings``)::

    <lang>.npy          float32 (or float16) [layers + 1, n, hidden], row i = sentence i of the corpus
    <lang>.lengths.npy  int32 [n]: sentence i's token count as encoded (special tokens included, after
                        truncation), in the order of <lang>.npy; consumers match sentences by length
    meta.json    {"variant", "language" (mask language or null), "languages", "n",
                  "layers" ([0, 1, ..., L]), "hidden", "pooling", "padding_fraction",
                  "ids_sha256" (of the corpus' sentence ids), "dtype",
                  "max_length" (the limit applied, in tokens),
                  "truncated" ({"<lang>": sentences whose untruncated token count exceeds max_length}),
                  "truncated_total" (their sum over languages),
                  "at_max_length" (sentences of exactly max_length tokens once encoded, cut or not), ...}

Version 2: ``max_length`` defaults to the model's position limit (was 128), ``<lang>.lengths.npy``
and ``truncated`` are new.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageInterrupted, StageParams, stage
from stages._io import META_FILE, effective_seed, get_input, optional_input, write_json

VARIANTS = ("full", "subnetwork", "base", "random")


class EncodeParams(StageParams):
    """Parameters of the ``encode`` stage."""

    variant: Literal["full", "subnetwork", "base", "random"] = Field(
        "full", description="Which model encodes: the input model, its subnetwork for a language, a base model, "
        "or a randomly initialised one."
    )
    language: str | None = Field(
        None, description="subnetwork: the language whose head mask gates the model (sentences of every "
        "language are encoded); ignored by the other variants."
    )
    base_model: str | None = Field(
        None, description="base: hub name or local path of the base model; None: the input model, labelled base."
    )
    batch_size: int = Field(32, ge=1, description="Sentences per forward pass.")
    max_length: int | None = Field(
        None, ge=2, description="Truncate sentences to this many tokens (special tokens included), clamped to the "
        "model's limit; None: the model's limit (its position embeddings, the tokenizer's model_max_length)."
    )
    dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the stored encodings.")
    include_special_tokens: bool = Field(
        False, description="Pool over <s>/</s> too (False: only the sentence's own tokens)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    seed: int | None = Field(None, description="random: initialisation seed; None: the job's seed.")

    @model_validator(mode="after")
    def _check(self) -> EncodeParams:
        if self.base_model is not None and self.variant != "base":
            raise ValueError("base_model is only used by variant=base")
        return self


# --------------------------------------------------------------------------------------------------
# Pure helpers
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


def load_any_model(path: Path | str) -> Any:
    """A masked LM from a directory or hub name; a bare encoder (AutoModel) when it has no MLM head."""
    from transformers import AutoModel

    from stages.mlm import load_model

    try:
        return load_model(path)
    except (OSError, ValueError) as e:
        try:
            return AutoModel.from_pretrained(str(path))
        except (OSError, ValueError):
            raise ValueError(f"cannot load a model from {str(path)!r} ({e}); HF_HUB_OFFLINE=1 forbids downloads") from e


def random_model(model_dir: Path | str, seed: int) -> Any:
    """A model with the config of ``model_dir``, freshly initialised from ``seed``, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(config)
    return model.eval()


def _mask_for(params: EncodeParams, inputs: Inputs) -> tuple[Any, str | None]:
    """The subnetwork's head mask and language (None, None for the other variants)."""
    from stages.prune import read_mask_dir

    mask_in = optional_input(inputs, "mask")
    if params.variant != "subnetwork":
        if mask_in is not None:
            raise ValueError(f"variant={params.variant} takes no 'mask' input; connect masks to variant=subnetwork")
        return None, None
    if mask_in is None:
        raise ValueError("variant=subnetwork needs a 'mask' input (a head-mask artifact of stage prune)")
    mask, info = read_mask_dir(mask_in.path)
    mask_lang = info.get("language") or mask_in.metadata.get("language") or mask_in.point.get("language")
    language = params.language or mask_lang
    if params.language and mask_lang and params.language != mask_lang:
        raise ValueError(f"language={params.language!r} but the mask input is the mask of {mask_lang!r}")
    if not language:
        raise ValueError("variant=subnetwork: set language (the mask's mask.json names none)")
    return mask, str(language)


def _load_variant(params: EncodeParams, model_dir: Path, seed: int) -> tuple[Any, Any, str]:
    """(model, tokenizer, description of where the model came from)."""
    from stages.mlm import load_tokenizer

    tokenizer_src: Path | str = model_dir
    if params.variant == "random":
        return random_model(model_dir, seed), load_tokenizer(model_dir), f"random init (seed {seed}) of the input model's config"
    if params.variant == "base" and params.base_model is not None:
        model = load_any_model(params.base_model)
        try:
            return model, load_tokenizer(params.base_model), params.base_model
        except (OSError, ValueError, TypeError):
            return model, load_tokenizer(tokenizer_src), params.base_model
    return load_any_model(model_dir), load_tokenizer(tokenizer_src), "input model"


def prefetch_encode(params: EncodeParams) -> Iterator[str]:
    """variant=base with a base_model: that model and its tokenizer (``prefetch`` hook)."""
    from stages.hub import fetch_model, fetch_tokenizer
    from stages.mlm import load_tokenizer

    if params.variant != "base" or params.base_model is None:
        return
    yield fetch_model(params.base_model, load_any_model)
    try:
        yield fetch_tokenizer(params.base_model, load_tokenizer)
    except (OSError, ValueError, TypeError):  # as the stage: it then uses the input model's tokenizer
        yield f"no tokenizer in {params.base_model}: encode uses the input model's"


@stage(
    "encode",
    params=EncodeParams,
    inputs={
        "model": Input(type="model"),
        "parallel": Input(type="parallel-corpus"),
        "mask": Input(type="head-mask", optional=True),
    },
    outputs={"encodings": "encodings"},
    version="2",  # 2: max_length defaults to the model's limit; <lang>.lengths.npy; truncated counts
    prefetch=prefetch_encode,
)
def encode_stage(params: EncodeParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Pooled hidden states of every layer for every sentence of a parallel corpus, per language."""
    import numpy as np

    from stages.device import pick_device
    from stages.gating import HeadGates
    from stages.mlm import configure_threads
    from stages.parallel import ID_KEY, ids_digest, read_parallel

    model_in, par_in = get_input(inputs, "model"), get_input(inputs, "parallel")
    languages, rows = read_parallel(par_in.path)
    if not rows:
        raise ValueError(f"parallel corpus {par_in.path} is empty")
    mask, mask_language = _mask_for(params, inputs)
    seed = effective_seed(ctx.seed, params.seed)
    configure_threads()
    device = pick_device(ctx.gpus, ctx.job_label, params.device)
    model, tokenizer, origin = _load_variant(params, Path(model_in.path), seed)
    model = model.to(device).eval()
    gates = HeadGates(model, mask) if mask is not None else None
    out = ctx.output_dir("encodings")
    padding: dict[str, float] = {}
    truncated: dict[str, int] = {}
    totals = {"padded_positions": 0.0, "positions": 0.0, "seconds": 0.0, "at_max_length": 0.0}
    max_length = effective_max_length(model, tokenizer, params.max_length)
    try:
        for lang in languages:
            texts = [r[lang] for r in rows]
            tokenized = tokenize_sentences(tokenizer, texts, max_length)
            arr, stats = encode_sentences(
                model, tokenizer, texts, batch_size=params.batch_size, max_length=max_length,
                include_special_tokens=params.include_special_tokens, device=device,
                should_stop=ctx.stop_requested.is_set, tokenized=tokenized,
            )
            if not np.isfinite(arr).all():
                raise ValueError(f"encode: non-finite hidden states for {lang}")
            np.save(out / f"{lang}.npy", arr.astype(params.dtype))
            np.save(out / f"{lang}.lengths.npy", np.asarray(tokenized.lengths, dtype=np.int32))
            padding[lang] = stats["padding_fraction"]
            truncated[lang] = tokenized.truncated
            for k in totals:
                totals[k] += stats[k]
            ctx.log({f"{lang}/sentences_per_s": len(rows) / max(stats["seconds"], 1e-9),
                     f"{lang}/truncated": float(tokenized.truncated),
                     f"{lang}/padding_fraction": stats["padding_fraction"],
                     f"{lang}/tokens_per_sentence": stats["tokens"] / len(rows)})
    finally:
        if gates is not None:
            gates.remove()
    n_layers = int(model.config.num_hidden_layers)
    meta: dict[str, Any] = {
        "variant": params.variant,
        "language": mask_language,
        "languages": languages,
        "n": len(rows),
        "layers": list(range(n_layers + 1)),
        "hidden": int(model.config.hidden_size),
        "pooling": pooling_description(params.include_special_tokens),
        "padding_fraction": totals["padded_positions"] / totals["positions"] if totals["positions"] else 0.0,
        "padding_fraction_per_language": padding,
        "ids_sha256": ids_digest(r[ID_KEY] for r in rows),
        "dtype": params.dtype,
        "max_length": max_length,
        "truncated": truncated,
        "truncated_total": sum(truncated.values()),
        "at_max_length": int(totals["at_max_length"]),
        "batch_size": params.batch_size,
        "model": origin,
        "heads_kept": None if mask is None else int((mask > 0.5).sum()),
    }
    write_json(out / META_FILE, meta)  # deterministic content only: timings go to the log and metadata
    speed = len(rows) * len(languages) / max(totals["seconds"], 1e-9)
    ctx.log({"padding_fraction": meta["padding_fraction"], "sentences_per_s": speed})
    return {"encodings": {**meta, "device": str(device), "sentences_per_s": speed}}


ENCODE: StageDef = encode_stage
