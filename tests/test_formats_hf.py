"""The ``datasets`` directories of the corpus, dataset and parallel-corpus artifacts (``stages.formats.hf``):
the same rows give the same bytes in separate processes (identical reruns dedupe in the store), empty
splits round-trip, writing is quiet, and a read-only copy (as the store materializes inputs) opens."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from stagekit import tree_bytes

from stages.formats import hf
from stages.formats.corpus import Doc, read_texts
from stages.formats.corpus import write_language as write_corpus_language
from stages.formats.dataset import load_split, split_blocks
from stages.formats.dataset import write_language as write_dataset_language
from stages.formats.parallel import read_parallel, write_parallel

ROOT = Path(__file__).resolve().parents[1]

WRITE_ALL = """
import sys
from pathlib import Path
import numpy as np
from stages.formats.corpus import Doc, write_language as corpus
from stages.formats.dataset import write_language as dataset
from stages.formats.parallel import write_parallel

out, word = Path(sys.argv[1]), sys.argv[2]
corpus(out / "corpus", "en", {"train": [Doc(f"d{i}", f"{word} {i} ü 中") for i in range(1500)], "test": []})
dataset(out / "dataset", "en", {"train": np.arange(1500 * 8, dtype=np.int32).reshape(1500, 8), "select": np.ones((2, 8))})
write_parallel(out / "parallel", ["en", "de"], [{"id": str(i), "en": f"{word} {i}", "de": f"das {i}"} for i in range(30)])
"""


def write_all(out: Path, word: str) -> None:
    """The three artifact types written in a fresh interpreter (a random fingerprint would differ)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", WRITE_ALL, str(out), word], check=True, env=env, cwd=ROOT)


def test_the_same_rows_give_the_same_bytes_in_separate_processes(tmp_path: Path) -> None:
    write_all(tmp_path / "a", "word")
    write_all(tmp_path / "b", "word")
    write_all(tmp_path / "c", "other")
    for kind in ("corpus", "dataset", "parallel"):
        a, b, c = (tree_bytes(tmp_path / run / kind) for run in "abc")
        assert a == b, kind
        assert any(name.endswith("state.json") for name in a)
    fingerprint = {run: (tmp_path / run / "corpus" / "en" / "train" / "state.json").read_text() for run in "ac"}
    assert fingerprint["a"] != fingerprint["c"]  # the fingerprint follows the content
    assert tree_bytes(tmp_path / "a" / "parallel") != tree_bytes(tmp_path / "c" / "parallel")


def test_empty_splits_round_trip(tmp_path: Path) -> None:
    """save_to_disk writes an empty dataset as 0 shards, which load_from_disk cannot open: written as 1."""
    write_corpus_language(tmp_path / "c", "en", {"train": [Doc("1", "text")], "test": []})
    assert len(datasets.load_from_disk(str(tmp_path / "c" / "en"))["test"]) == 0
    assert list(read_texts(tmp_path / "c", "en", "test")) == []
    write_parallel(tmp_path / "p", ["en"], [])
    assert read_parallel(tmp_path / "p") == (["en"], [])
    write_dataset_language(tmp_path / "d", "en", {"train": np.zeros((0, 4), np.int32)})
    assert sum(len(b) for b in split_blocks(tmp_path / "d", "en", "train")) == 0


def test_writing_and_reading_are_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """No progress bar of datasets reaches the job log, and the global switch is left as it was."""
    from datasets.utils import are_progress_bars_disabled

    before = are_progress_bars_disabled()
    write_parallel(tmp_path, ["en"], [{"id": str(i), "en": "x"} for i in range(3_000)])
    assert read_parallel(tmp_path)[1][2_999] == {"id": "2999", "en": "x"}
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert are_progress_bars_disabled() == before


def test_a_read_only_copy_opens_and_reading_writes_nothing(tmp_path: Path) -> None:
    """The store hands stages read-only copies of their inputs: memory-mapped reading needs no write access
    and leaves the directory as it was (no cache or lock file; checked as well where root ignores modes)."""
    rows = np.arange(2_500 * 4, dtype=np.int32).reshape(2_500, 4)
    write_dataset_language(tmp_path, "en", {"train": rows, "select": rows[:3], "report": rows[3:5]})
    before = tree_bytes(tmp_path)
    paths = sorted(tmp_path.rglob("*"), reverse=True)
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        np.testing.assert_array_equal(load_split(tmp_path, "en", "train"), rows)
        assert len(split_blocks(tmp_path, "en", "train")) == 3  # record batches of 1,000 rows
        assert len(datasets.load_from_disk(str(tmp_path / "en"))["report"]) == 2
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert tree_bytes(tmp_path) == before


def test_fingerprint_is_of_the_rows_not_of_how_they_were_sliced() -> None:
    import pyarrow as pa

    values = np.arange(12, dtype=np.int32).reshape(6, 2)
    whole = hf.fixed_width_array(values)
    assert hf.fingerprint(pa.table({"x": whole.slice(2)})) == hf.fingerprint(pa.table({"x": hf.fixed_width_array(values[2:])}))
    assert hf.fingerprint(pa.table({"x": whole})) != hf.fingerprint(pa.table({"x": whole.slice(1)}))
