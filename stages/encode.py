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

Encoding (:mod:`stages.sentence_encoder`): every language's sentences are tokenized with the model's
tokenizer and truncated to ``max_length`` tokens (default: the model's own limit; the sentences cut are
counted per language), run through the encoder in length-sorted batches, and mean-pooled per layer over
the sentence's own tokens (``include_special_tokens=False``: ``<s>``/``</s>`` left out).

Output ``encodings`` (type ``encodings``): ``<lang>.npy`` (every hidden state, per sentence),
``<lang>.lengths.npy`` (token counts) and ``meta.json`` (variant, languages, ``max_length``, ``truncated``,
...), laid out, written and read by :mod:`stages.formats.encodings`.

Version 2: ``max_length`` defaults to the model's position limit (was 128), ``<lang>.lengths.npy``
and ``truncated`` are new.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageParams, stage
from stages._io import effective_seed, get_input, optional_input
from stages.formats.encodings import write_language, write_meta
from stages.formats.masks import read_mask_dir
from stages.formats.names import SUBNETWORK, Variant
from stages.formats.parallel import ID_KEY, ids_digest, read_parallel
from stages.sentence_encoder import effective_max_length, encode_sentences, pooling_description, tokenize_sentences


class EncodeParams(StageParams):
    """Parameters of the ``encode`` stage."""

    variant: Variant = Field(
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
# The model of each variant (torch, imported lazily)
# --------------------------------------------------------------------------------------------------


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
    mask_in = optional_input(inputs, "mask")
    if params.variant != SUBNETWORK:
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
            write_language(out, lang, arr, tokenized.lengths, params.dtype)
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
    write_meta(out, meta)  # deterministic content only: timings go to the log and metadata
    speed = len(rows) * len(languages) / max(totals["seconds"], 1e-9)
    ctx.log({"padding_fraction": meta["padding_fraction"], "sentences_per_s": speed})
    return {"encodings": {**meta, "device": str(device), "sentences_per_s": speed}}


ENCODE: StageDef = encode_stage
