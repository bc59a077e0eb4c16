"""Small helpers shared by the data stages: deterministic JSON/JSONL files, seeds, inputs, progress.

Everything here is cheap to import (standard library only): stage modules import it at module level.
Files are written byte-deterministically (sorted keys, fixed separators, UTF-8, trailing newline)
so that the engine's content dedup sees identical artifacts for identical inputs and parameters.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.stage import Inputs, ResolvedInput, StageContext

T = TypeVar("T")

META_FILE = "meta.json"  # the metadata file of the corpus, dataset, parallel-corpus and encodings artifacts


def dumps_line(obj: Any) -> str:
    """One JSON object as a single deterministic line (sorted keys, UTF-8 text kept as is)."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write ``records`` one JSON object per line; return how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(dumps_line(rec))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSON Lines file (blank lines are skipped)."""
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys and a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=2)
    path.write_text(text + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


def stable_rank(seed: int, key: str) -> str:
    """A seeded, platform-independent sort key for ``key`` (sha256 of ``"seed:key"``).

    Ordering documents by this key is a seeded shuffle that does not depend on the order in which
    the documents were read, and gives the same order to documents with the same id in every
    language (aligned Bible chapters land in the same split everywhere).
    """
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def effective_seed(ctx_seed: int, override: int | None) -> int:
    """The seed a stage uses: the ``seed`` parameter when given, else the job's seed."""
    return ctx_seed if override is None else override


def optional_input(inputs: Inputs, name: str) -> ResolvedInput | None:
    """The single resolved input ``name``, or None when it is not connected."""
    value = inputs.get(name)
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"input {name!r}: expected exactly one artifact, got {len(value)}")
        value = value[0]
    if value is not None and not isinstance(value, ResolvedInput):
        raise ValueError(f"input {name!r}: expected a resolved artifact, got {type(value).__name__}")
    return value


def get_input(inputs: Inputs, name: str) -> ResolvedInput:
    """The single resolved input ``name``, which must be connected."""
    value = optional_input(inputs, name)
    if value is None:
        raise ValueError(f"input {name!r} is missing: connect a {name!r} artifact to this stage")
    return value


def progress(
    iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", ctx: StageContext | None = None
) -> Iterator[T]:
    """Yield the items of ``iterable``, reporting how many have been yielded so far: to
    ``ctx.progress`` (the job's progress file and one plain log line per update), or without
    ``ctx`` as a plain line on stderr every ``PLAIN_EVERY_S`` and at the end. ``total``: the
    length of ``iterable`` where it has one."""
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    report = ctx.progress if ctx is not None else _PlainProgress(desc).report
    done = 0
    for item in iterable:
        report(done, total, unit)
        yield item
        done += 1
    report(done, total, unit)


PLAIN_EVERY_S = 10.0


class _PlainProgress:
    """Progress without a stage context: ``desc: 12/40 batches`` on stderr, the first, one every
    ``PLAIN_EVERY_S`` and the last (a total reached); one line each, no carriage returns."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.shown_at: float | None = None

    def report(self, done: int, total: int | None, unit: str) -> None:
        now = time.monotonic()
        final = total is not None and done >= total
        if self.shown_at is not None and not final and now - self.shown_at < PLAIN_EVERY_S:
            return
        self.shown_at = now
        count = f"{done}/{total}" if total is not None else str(done)
        print(f"{self.desc}: {count} {unit}", file=sys.stderr, flush=True)
