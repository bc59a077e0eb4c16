"""Fetching what stages load by name, for the stages' ``prefetch`` hooks (``python -m orchestrator prefetch``).

Each helper loads the thing exactly as the stage will (the same loader, the same arguments), so
that what lands in the Hugging Face caches is what a job with ``HF_HUB_OFFLINE=1`` finds there,
and returns one line saying what it fetched and where it lives. Local directories are loaded too
(that checks them) but nothing is downloaded for them. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def origin(name: str) -> str:
    """Where ``name`` is read from: a local directory, or the hub through its local cache."""
    if Path(name).expanduser().exists():
        return "local directory"
    from huggingface_hub import constants

    how = "offline: found in the cache" if constants.is_offline_mode() else "hub"
    return f"{how} {constants.HF_HUB_CACHE}"


def _named(load: Callable[[str], Any], name: str, what: str) -> Any:
    """``load(name)``; an error that does not name ``name`` (transformers' often do not) is re-raised naming it."""
    try:
        return load(name)
    except (OSError, ValueError) as e:
        if name in str(e):
            raise
        raise ValueError(f"cannot load {what} {name!r}: {e}") from e


def fetch_model(name: str, load: Callable[[str], Any] | None = None) -> str:
    """Load the model ``name`` with ``load`` (default: ``stages.mlm.load_model``, what train uses)."""
    from stages.mlm import load_model

    model = _named((load or load_model), name, "model")
    n = sum(p.numel() for p in model.parameters())
    del model
    size = f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"
    return f"model {name} ({size} parameters; {origin(name)})"


def fetch_tokenizer(name: str, load: Callable[[str], Any] | None = None) -> str:
    """Load the tokenizer ``name`` with ``load`` (default: ``stages.mlm.load_tokenizer``)."""
    from stages.mlm import load_tokenizer

    tokenizer = _named((load or load_tokenizer), name, "tokenizer")
    return f"tokenizer {name} ({len(tokenizer):,} tokens; {origin(name)})"


def dataset_origin() -> str:
    """Where ``datasets`` keeps what it downloaded and prepared."""
    from datasets import config

    how = "offline: found in the cache" if config.HF_DATASETS_OFFLINE else "hub"
    return f"{how} {config.HF_DATASETS_CACHE}"
