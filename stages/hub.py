"""Fetching what stages load by name, for the stages' ``prefetch`` hooks (``python -m orchestrator prefetch``),
and what the local caches already tell about it, for their ``check`` hooks (no network).

Each helper loads the thing exactly as the stage will (the same loader, the same arguments), so
that what lands in the Hugging Face caches is what a job with ``HF_HUB_OFFLINE=1`` finds there,
and returns one line saying what it fetched and where it lives. Local directories are loaded too
(that checks them) but nothing is downloaded for them. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import difflib
import functools
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


def cached_dataset_configs(path: str, revision: str | None) -> tuple[str, list[str]] | None:
    """The configs that the dataset card of hub dataset ``path`` lists, read from the local hub cache
    (no network) at ``revision`` (None: the cached ``main``), with the card's commit; None where that
    is not knowable here: a local folder or packaged builder, no cached card, a card listing no configs."""
    if path.count("/") != 1 or Path(path).expanduser().exists():
        return None
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    try:
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else (revision or "")
        card = repo / "snapshots" / commit / "README.md"
        if not commit or not card.is_file():
            return None
        configs = _card_configs(str(card), card.stat().st_mtime_ns)
    except (OSError, ValueError):
        return None
    return (commit, list(configs)) if configs else None


@functools.lru_cache(maxsize=8)
def _card_configs(card: str, mtime_ns: int) -> tuple[str, ...]:
    """``config_name`` of each entry of ``configs`` in a dataset card's YAML header (cached per file version)."""
    import yaml

    text = Path(card).read_text(encoding="utf-8")
    if not text.startswith("---"):
        return ()
    header = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.load(header, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return ()
    entries = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        return ()
    return tuple(str(e["config_name"]) for e in entries if isinstance(e, dict) and "config_name" in e)


def config_problems(path: str, template: str, revision: str | None, languages: list[str]) -> list[str]:
    """``languages: ...`` naming the languages whose config (``template`` with ``{lang}`` filled in) the
    cached dataset card of ``path`` does not list (see :func:`cached_dataset_configs`); [] if unknowable."""
    found = cached_dataset_configs(path, revision)
    if found is None:
        return []
    commit, configs = found
    known = set(configs)
    missing = [lang for lang in languages if template.replace("{lang}", lang) not in known]
    if not missing:
        return []
    head, _, tail = template.partition("{lang}")
    has = sorted(c[len(head) : len(c) - len(tail)] for c in configs if c.startswith(head) and c.endswith(tail))
    close = sorted({m for lang in missing for m in difflib.get_close_matches(lang, has, n=3, cutoff=0.5)})
    shown = ", ".join(repr(template.replace("{lang}", lang)) for lang in missing)
    what = f"{len(has)} languages" + (f", e.g. {', '.join(close)}" if close else "")
    return [
        f"languages: {path} has no config {shown}: its dataset card (cached, revision {commit[:8]}) lists {template} for "
        f"{what}; remove {'it' if len(missing) == 1 else 'them'}, or if the dataset has gained it since, refresh the "
        f"card: hf download --repo-type dataset {path} README.md"
    ]
