"""Parallel sentences (artifact type ``parallel-corpus``): written by ``parallel``; read by ``encode`` and
``token_overlap``.

Layout::

    dataset_info.json, state.json, data-*.arrow
                     a ``datasets.Dataset`` saved with ``save_to_disk`` (:mod:`.hf`) in the artifact's own
                     directory: one row per sentence (a :data:`Row`), columns ``id`` and one per language
                     (meta.json's order), every language on every row, in source order
    meta.json        {"languages", "n", "source", "seed", "ids_sha256", "counts", ...}

Open it with ``datasets.load_from_disk(artifact)``. ``ids_sha256`` (:func:`ids_digest`) is how downstream
stages check that they read the same sentences.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from stages._io import META_FILE
from stages.formats import hf

ID_KEY = "id"
OLD_FILE = "parallel.jsonl"  # the parallel stage before version 2 wrote JSON lines

Row = dict[str, str]  # {"id": ..., "<lang>": text, ...}


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 of the sentence ids in order (how downstream stages check they share a corpus)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def write_parallel(out: Path, languages: Sequence[str], rows: Sequence[Row]) -> int:
    """Write the rows (``id`` and every language) as a ``datasets.Dataset`` in ``out``; return how many."""
    names = [ID_KEY, *languages]
    hf.save(out, hf.make_dataset({name: hf.string_array(r[name] for r in rows) for name in names}))
    return len(rows)


def read_parallel(path: Path) -> tuple[list[str], list[Row]]:
    """Languages (meta.json order) and rows of a ``parallel-corpus`` artifact directory."""
    path = Path(path)
    if not hf.is_saved(path):
        if (path / OLD_FILE).is_file():
            raise ValueError(
                f"{path} holds the {OLD_FILE} of a parallel stage before version 2, not a datasets directory; "
                "re-run the parallel stage and the stages after it"
            )
        raise ValueError(f"{path} is not a parallel-corpus artifact: no {' / '.join(hf.DATASET_FILES)}")
    dataset = hf.load(path)
    names = list(dataset.column_names)
    meta_path = path / META_FILE
    langs = json.loads(meta_path.read_text(encoding="utf-8")).get("languages") if meta_path.is_file() else None
    if not langs:
        langs = [n for n in names if n != ID_KEY]
    missing = [name for name in (ID_KEY, *langs) if name not in names]
    if missing:
        raise ValueError(f"{path}: the parallel sentences have no column {missing}")
    columns = {name: list(hf.string_column(dataset, name)) for name in (ID_KEY, *langs)}
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    return list(langs), rows
