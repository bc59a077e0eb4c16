"""Token chunks per language and split (artifact type ``dataset``): written by ``tokenize``; read by
``train``, ``prune`` and ``cross_eval`` (through :mod:`stages.mlm`).

Layout::

    <lang>/            a ``datasets.DatasetDict`` saved with ``save_to_disk`` (:mod:`.hf`): splits ``train``,
                       ``select``, ``report`` (``<lang>/<split>/``), one row per chunk, one column
                       ``input_ids``: block_size int32 token ids (labels = input_ids: the consumer's job)
    meta.json          block_size, vocab_size, special token ids, doc_boundary, splits, test_split
                       (the rule), counts per language and split (train, select, report)

Open one language with ``datasets.load_from_disk(f"{artifact}/{lang}")`` (a ``DatasetDict``; add
``.with_format("torch")`` for tensors). The stages read through :func:`load_split` (a numpy array in
memory) and :func:`split_blocks` (memory-mapped numpy views, for the training set).

``select`` and ``report`` are the two halves of the language's test documents (:mod:`stages.dataset`):
decisions (best checkpoint, head importance, pruning threshold) are taken on ``select``, reported numbers
are measured on ``report``. Datasets of the tokenize stage before version 3 (``.npy`` files; version 1
had one ``test.npy`` and no halves) are refused with what to do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stages._io import META_FILE, write_json
from stages.formats import hf

if TYPE_CHECKING:
    import numpy as np

SELECT: Literal["select"] = "select"  # the half of the test documents that decisions are taken on
REPORT: Literal["report"] = "report"  # the half that reported numbers are measured on
TEST_HALVES: tuple[str, str] = (SELECT, REPORT)
SPLITS: tuple[str, str, str] = ("train", *TEST_HALVES)
COLUMN = "input_ids"


def write_language(out: Path, lang: str, splits: Mapping[str, Any]) -> None:
    """Write the chunks of one language (``{split: [n_chunks, block_size] array}``) as ``out/<lang>/``,
    a ``DatasetDict`` of int32 rows."""
    import numpy as np

    datasets = {}
    for split, chunks in splits.items():
        rows = np.ascontiguousarray(chunks, dtype=np.int32)
        datasets[split] = hf.make_dataset({COLUMN: hf.fixed_width_array(rows)})
    hf.save_splits(out / lang, datasets)


def write_dataset_meta(out: Path, meta: Mapping[str, Any]) -> None:
    write_json(out / META_FILE, meta)


def read_dataset_meta(dataset_dir: Path) -> dict[str, Any]:
    """The ``meta.json`` of a dataset artifact ({} when absent)."""
    path = Path(dataset_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def dataset_languages(dataset_dir: Path) -> list[str]:
    """The languages of a dataset artifact: ``meta.json``'s order, else the sorted ``<lang>/`` dirs."""
    dataset_dir = Path(dataset_dir)
    langs = read_dataset_meta(dataset_dir).get("languages")
    if isinstance(langs, list) and langs and all(isinstance(x, str) for x in langs):
        return list(langs)
    found = sorted(p.name for p in dataset_dir.iterdir() if p.is_dir() and hf.is_saved(p))
    if not found:
        raise ValueError(f"{dataset_dir} is not a dataset artifact: no <lang>/{hf.DATASET_DICT_FILE} inside")
    return found


def _split_dir(dataset_dir: Path, lang: str, split: str) -> Path:
    """The saved dataset of one language and split (checked), with what to do when it is missing."""
    if split not in SPLITS:
        raise ValueError(f"dataset split must be 'train', 'select' or 'report', not {split!r}")
    path = Path(dataset_dir) / lang / split
    if hf.is_saved(path):
        return path
    if any((Path(dataset_dir) / lang).glob("*.npy")):
        raise ValueError(
            f"dataset {dataset_dir} holds {lang}/*.npy files of a tokenize stage before version 3, not "
            f"{lang}/{split}/ (a datasets directory); re-run the tokenize stage and the stages after it"
        )
    raise ValueError(f"dataset {dataset_dir} has no {lang}/{split} (a datasets directory written by the tokenize stage)")


def split_blocks(dataset_dir: Path, lang: str, split: str) -> list[np.ndarray]:
    """The ``[rows, block_size]`` int32 token ids of one language and split, as read-only numpy views of the
    memory-mapped Arrow record batches (nothing is read until used), in row order."""
    return hf.fixed_width_blocks(hf.load(_split_dir(dataset_dir, lang, split)), COLUMN)


def load_split(dataset_dir: Path, lang: str, split: str) -> np.ndarray:
    """The ``[n_chunks, block_size]`` int32 token ids of one language and split, in memory.

    ``split`` is ``train``, ``select`` or ``report``; a dataset of an older tokenize stage is refused with
    what to do.
    """
    import numpy as np

    blocks = split_blocks(dataset_dir, lang, split)
    if not blocks:
        raise ValueError(f"dataset {dataset_dir}: {lang}/{split} has no rows")
    return np.concatenate(blocks) if len(blocks) > 1 else np.array(blocks[0])
