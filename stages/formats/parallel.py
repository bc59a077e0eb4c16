"""Parallel sentences (artifact type ``parallel-corpus``): written by ``parallel``; read by ``encode`` and
``token_overlap``.

Layout::

    parallel.jsonl   one {"id": ..., "<lang>": text, ...} per sentence (a :data:`Row`), every language on
                     every line, in source order
    meta.json        {"languages", "n", "source", "seed", "ids_sha256", "counts", ...}

``ids_sha256`` (:func:`ids_digest`) is how downstream stages check that they read the same sentences.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from stages._io import META_FILE, read_jsonl, write_jsonl

PARALLEL_FILE = "parallel.jsonl"
ID_KEY = "id"

Row = dict[str, str]  # {"id": ..., "<lang>": text, ...}


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 of the sentence ids in order (how downstream stages check they share a corpus)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def write_parallel(out: Path, rows: Sequence[Row]) -> int:
    """Write parallel.jsonl; return how many rows were written."""
    return write_jsonl(out / PARALLEL_FILE, rows)


def read_parallel(path: Path) -> tuple[list[str], list[Row]]:
    """Languages (meta.json order) and rows of a ``parallel-corpus`` artifact directory."""
    path = Path(path)
    file = path / PARALLEL_FILE
    if not file.is_file():
        raise ValueError(f"{path} is not a parallel-corpus artifact: no {PARALLEL_FILE}")
    rows = [{k: str(v) for k, v in r.items()} for r in read_jsonl(file)]
    meta_path = path / META_FILE
    langs = json.loads(meta_path.read_text(encoding="utf-8")).get("languages") if meta_path.is_file() else None
    if not langs:
        langs = sorted(k for k in (rows[0] if rows else {}) if k != ID_KEY)
    for i, r in enumerate(rows):
        missing = [lang for lang in langs if lang not in r]
        if missing or ID_KEY not in r:
            raise ValueError(f"{file}: line {i + 1} lacks {missing or [ID_KEY]}")
    return list(langs), rows
