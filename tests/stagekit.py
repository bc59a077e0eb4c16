"""Run a stage in tests without the engine: a test double of ``StageContext`` and input helpers.

``FakeContext`` implements the :class:`orchestrator.stage.StageContext` protocol on a temporary
directory and records every ``log()`` call; ``make_input`` wraps a directory as a
``ResolvedInput``; ``run_stage`` validates a params dict with the stage's model and calls it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # running pytest without an installed package / pythonpath setting
    sys.path.insert(0, str(_ROOT))

from orchestrator.stage import ResolvedInput, StageDef  # noqa: E402


@dataclass
class FakeContext:
    """A StageContext writing outputs under ``root/outputs/<name>``."""

    root: Path
    seed: int = 0
    job_label: str = "test-job"
    stop_requested: threading.Event = field(default_factory=threading.Event)
    metrics: list[tuple[dict[str, float], int | None]] = field(default_factory=list)
    reported: list[tuple[int, int | None, str]] = field(default_factory=list)  # every progress() call
    provenance: Mapping[str, Any] = field(default_factory=dict)
    gpus: int = 0
    rank: int = 0
    world_size: int = 1

    @property
    def checkpoint_dir(self) -> Path:
        path = self.root / "checkpoint"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def output_dir(self, name: str) -> Path:
        path = self.root / "outputs" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def progress(self, done: int, total: int | None = None, unit: str = "step") -> None:
        self.reported.append((done, total, unit))

    def logged(self) -> dict[str, float]:
        """Every metric logged so far, the last value of each name."""
        out: dict[str, float] = {}
        for m, _ in self.metrics:
            out.update(m)
        return out


def make_input(
    path: Path | str,
    type: str,
    *,
    name: str | None = None,
    point: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    version: int = 0,
) -> ResolvedInput:
    """A ResolvedInput for an artifact directory that already exists on disk."""
    return ResolvedInput(
        name=name or f"test.{type}",
        version=version,
        type=type,
        path=Path(path),
        metadata=dict(metadata or {}),
        point=dict(point or {}),
        job_key=f"test-{name or type}",
    )


def run_stage(
    stage: StageDef,
    params: Mapping[str, Any],
    ctx: FakeContext,
    inputs: Mapping[str, ResolvedInput | list[ResolvedInput]] | None = None,
) -> Mapping[str, Mapping[str, Any]] | None:
    """Validate ``params`` with the stage's model and run the stage function."""
    model = stage.params.model_validate(dict(params))
    return stage.fn(model, dict(inputs or {}), ctx)


def write_corpus(root: Path, docs: Mapping[str, Mapping[str, list[str]]]) -> Path:
    """Write a ``corpus`` artifact with its format's writer: ``docs[lang][split]`` is a list of document texts."""
    import json

    from stages.formats.corpus import Doc, write_language

    root.mkdir(parents=True, exist_ok=True)
    for lang, splits in docs.items():
        write_language(root, lang, {
            split: [Doc(id=f"{lang}-{split}-{i}", text=t) for i, t in enumerate(splits.get(split, []))]
            for split in ("train", "test")
        })
    (root / "meta.json").write_text(json.dumps({"languages": list(docs)}), encoding="utf-8")
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): two artifacts are the same when these are equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


WORDS: dict[str, list[str]] = {
    "en": [
        "the",
        "of",
        "and",
        "to",
        "in",
        "house",
        "water",
        "light",
        "river",
        "stone",
        "bread",
        "king",
        "people",
        "city",
        "road",
        "night",
    ],
    "ru": [
        "и",
        "в",
        "не",
        "на",
        "я",
        "дом",
        "вода",
        "свет",
        "река",
        "камень",
        "хлеб",
        "царь",
        "народ",
        "город",
        "дорога",
        "ночь",
    ],
    "zh": list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"),
}


def sentences(lang: str, n: int, seed: int, words_per_sentence: int = 8) -> list[str]:
    """``n`` deterministic pseudo-random sentences from a small per-language word list."""
    import random

    rng = random.Random(f"{lang}:{seed}")
    sep = "" if lang == "zh" else " "
    end = "。" if lang == "zh" else "."
    return [sep.join(rng.choices(WORDS[lang], k=words_per_sentence)) + end for _ in range(n)]
