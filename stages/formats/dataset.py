"""Token chunks per language and split (artifact type ``dataset``): written by ``tokenize``; read by
``train``, ``prune`` and ``cross_eval`` (through :mod:`stages.mlm`).

Layout::

    <lang>/train.npy   int32 [n_chunks, block_size] input ids (labels = input_ids: the consumer's job)
    <lang>/select.npy  the selection half of the test documents (model selection, pruning)
    <lang>/report.npy  the reporting half of the test documents (reported perplexities)
    meta.json          block_size, vocab_size, special token ids, doc_boundary, splits, test_split
                       (the rule), counts per language and split (train, select, report)

``select`` and ``report`` are the two halves of the language's test documents (:mod:`stages.dataset`):
decisions (best checkpoint, head importance, pruning threshold) are taken on ``select``, reported numbers
are measured on ``report``. There is no ``test.npy`` any more (tokenize version 1 wrote one): a reader
that needs held-out text must say which half it means, and an old dataset is refused with what to do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stages._io import META_FILE, write_json

if TYPE_CHECKING:
    import numpy as np

SELECT: Literal["select"] = "select"  # the half of the test documents that decisions are taken on
REPORT: Literal["report"] = "report"  # the half that reported numbers are measured on
TEST_HALVES: tuple[str, str] = (SELECT, REPORT)
SPLITS: tuple[str, str, str] = ("train", *TEST_HALVES)


def split_path(dataset_dir: Path, lang: str, split: str) -> Path:
    """Where the chunks of one language and split live."""
    return Path(dataset_dir) / lang / f"{split}.npy"


def write_split(out: Path, lang: str, split: str, chunks: Any) -> None:
    """Write the chunks of one language and split as a contiguous int32 array."""
    import numpy as np

    np.save(split_path(out, lang, split), np.ascontiguousarray(chunks, dtype=np.int32))


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
    found = sorted(p.name for p in dataset_dir.iterdir() if p.is_dir() and (p / "train.npy").is_file())
    if not found:
        raise ValueError(f"{dataset_dir} is not a dataset artifact: no <lang>/train.npy inside")
    return found


def load_split(dataset_dir: Path, lang: str, split: str, *, mmap: bool = False) -> np.ndarray:
    """The ``[n_chunks, block_size]`` token ids of one language and split (``mmap``: memory-mapped).

    ``split`` is ``train``, ``select`` or ``report``. A dataset of the tokenize stage's version 1
    (one ``test.npy``, no halves) is refused with what to do.
    """
    import numpy as np

    if split not in SPLITS:
        raise ValueError(f"dataset split must be 'train', 'select' or 'report', not {split!r}")
    path = split_path(dataset_dir, lang, split)
    if not path.is_file() and split != "train" and (path.parent / "test.npy").is_file():
        raise ValueError(
            f"dataset {dataset_dir} has no {lang}/{split}.npy, only the {lang}/test.npy of an older tokenize "
            "stage that did not split the test documents into selection and reporting halves; re-run the "
            "tokenize stage (version 2 or later) and the stages after it"
        )
    if not path.is_file():
        raise ValueError(f"dataset {dataset_dir} has no {lang}/{split}.npy")
    arr = np.load(path, mmap_mode="r" if mmap else None)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected [n_chunks, block_size], got shape {arr.shape}")
    return arr
