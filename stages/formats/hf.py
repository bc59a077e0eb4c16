"""The on-disk form of the ``corpus``, ``dataset`` and ``parallel-corpus`` artifacts: Hugging Face ``datasets``
directories written by ``save_to_disk``, so that ``datasets.load_from_disk`` opens each of them.

Writing is deterministic, so that identical reruns give identical bytes (the store dedupes them):
``save_to_disk`` writes no timestamps, and the fingerprint it records in ``state.json`` is given here as
the sha256 of the table's Arrow stream (:func:`fingerprint`) instead of datasets' default (a slower hash
of its in-memory state, which depends on its version). An empty split is written as one shard (the
default, none, cannot be opened). datasets' progress bars are off while writing and reading (job logs
keep one line per update).

Reading also goes through ``datasets.load_from_disk``: the Arrow files are memory-mapped, not read.
:func:`fixed_width_blocks` gives the record batches of a fixed-width column as numpy views of that
memory map (no copy), which is how the training stage draws its random batches: datasets' own numpy
formatting is 6x slower per batch (``bench/dataset_format.py``).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# The files save_to_disk writes: a dataset directory has both, a dataset dict directory the third.
DATASET_FILES = ("dataset_info.json", "state.json")
DATASET_DICT_FILE = "dataset_dict.json"


class _HashSink(io.RawIOBase):
    """A file that keeps only the sha256 of what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        return view.nbytes


def fingerprint(table: Any) -> str:
    """The fingerprint recorded with a dataset: the first 16 hex digits of the sha256 of the pyarrow
    table's Arrow IPC stream (the same rows and types give the same stream, however they were sliced)."""
    import pyarrow as pa

    sink = _HashSink()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.sha256.hexdigest()[:16]


@contextmanager
def quiet() -> Iterator[None]:
    """datasets' progress bars off for the duration (and back as they were after)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def make_dataset(columns: Mapping[str, Any]) -> Any:
    """A ``datasets.Dataset`` of pyarrow arrays, in column order, fingerprinted by its content."""
    import pyarrow as pa
    from datasets import Dataset

    table = pa.table(dict(columns))
    return Dataset(table, fingerprint=fingerprint(table))


def string_array(values: Iterable[str]) -> Any:
    """A pyarrow string array (typed even when empty)."""
    import pyarrow as pa

    return pa.array(list(values), type=pa.string())


def _shards(dataset: Any) -> int | None:
    """save_to_disk's shard count: its default, but 1 for an empty dataset (the default, 0 shards, writes a
    directory that load_from_disk cannot open)."""
    return None if len(dataset) else 1


def save(path: Path, dataset: Any) -> None:
    """``dataset.save_to_disk(path)``, quietly."""
    with quiet():
        dataset.save_to_disk(str(path), num_shards=_shards(dataset))


def save_splits(path: Path, splits: Mapping[str, Any]) -> None:
    """Save ``{split: Dataset}`` as one ``DatasetDict`` directory (``dataset_dict.json`` + one dir per split)."""
    from datasets import DatasetDict

    with quiet():
        DatasetDict(dict(splits)).save_to_disk(str(path), num_shards={k: _shards(v) for k, v in splits.items()})


def is_saved(path: Path) -> bool:
    """Whether ``path`` is a directory ``datasets.load_from_disk`` can open."""
    return all((path / f).is_file() for f in DATASET_FILES) or (path / DATASET_DICT_FILE).is_file()


def load(path: Path) -> Any:
    """``datasets.load_from_disk(path)``, quietly: a memory-mapped ``Dataset`` or ``DatasetDict``."""
    from datasets import load_from_disk

    with quiet():
        return load_from_disk(str(path))


def fixed_width_array(rows: Any) -> Any:
    """A pyarrow fixed-size list array of the rows of a 2-D numpy array (no copy of the values)."""
    import numpy as np
    import pyarrow as pa

    rows = np.ascontiguousarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {rows.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def fixed_width_blocks(dataset: Any, column: str) -> list[np.ndarray]:
    """The record batches of a fixed-width list column as ``[rows, width]`` numpy views of the memory-mapped
    Arrow data (read-only, no copy), in row order."""
    chunks = dataset.data.column(column).chunks
    return [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, c.type.list_size) for c in chunks]


def string_column(dataset: Any, column: str) -> Iterator[str]:
    """The values of a string column, streamed one record batch at a time."""
    for chunk in dataset.data.column(column).chunks:
        yield from chunk.to_pylist()
