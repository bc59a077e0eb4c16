"""Remembered digests: unchanged files are not read again, changed or racy ones always are."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from orchestrator.artifacts import LocalStore, hashcache
from orchestrator.artifacts.hashcache import HashCache


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the cache actually reads (the real hash function, counted)."""
    seen: list[Path] = []
    real = hashcache.sha256_file

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(hashcache, "hash_file", counting)
    return seen


def test_unchanged_file_is_hashed_once_and_remembered_across_instances(tmp_path: Path, reads: list[Path]) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    cache = HashCache(tmp_path / "hashes.jsonl", settle_s=0.0)
    expected = hashlib.sha256(b"x" * 1000).hexdigest()
    assert cache.sha256(f) == cache.sha256(f) == expected
    assert HashCache(tmp_path / "hashes.jsonl", settle_s=0.0).sha256(f) == expected
    assert reads == [f]


def test_a_changed_file_is_hashed_again(tmp_path: Path, reads: list[Path]) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    cache = HashCache(tmp_path / "hashes.jsonl", settle_s=0.0)
    first = cache.sha256(f)
    f.write_bytes(b"two")  # same size: ctime/mtime (ns) change
    os.utime(f, ns=(0, 0))  # even with mtime forced back, ctime moves
    assert cache.sha256(f) == hashlib.sha256(b"two").hexdigest() != first
    assert len(reads) == 2


def test_recently_modified_files_are_not_remembered(tmp_path: Path, reads: list[Path]) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"fresh")
    cache = HashCache(tmp_path / "hashes.jsonl", settle_s=60.0)
    cache.sha256(f)
    cache.sha256(f)
    assert len(reads) == 2 and not (tmp_path / "hashes.jsonl").exists()


def test_torn_lines_are_ignored(tmp_path: Path, reads: list[Path]) -> None:
    (tmp_path / "hashes.jsonl").write_text('["1:2:3:4:5", "nothex"]\n{not json\n["x"]\n')
    f = tmp_path / "a.bin"
    f.write_bytes(b"data")
    assert HashCache(tmp_path / "hashes.jsonl", settle_s=0.0).sha256(f) == hashlib.sha256(b"data").hexdigest()


def test_store_relog_after_edit_commits_the_new_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"a" * 100)
    store = LocalStore(tmp_path / "store")
    store._hashes.settle_s = 0.0  # every file counts as settled: the worst case for staleness
    v0 = store.log("m", "model", src)
    assert store.log("m", "model", src).ref == v0.ref  # identical: same version
    (src / "w.bin").write_bytes(b"b" * 100)
    v1 = store.log("m", "model", src)
    assert v1.ref.version == 1
    assert (store.materialize(v1.ref) / "w.bin").read_bytes() == b"b" * 100


def test_known_and_remember_by_stat(tmp_path: Path) -> None:
    """The store hashes while copying and hands the cache the stats from before and after."""
    f = tmp_path / "a.bin"
    f.write_bytes(b"payload")
    sha = hashlib.sha256(b"payload").hexdigest()
    cache = HashCache(tmp_path / "hashes.jsonl", settle_s=0.0)
    before = f.stat()
    assert cache.known(before) is None
    f.write_bytes(b"PAYLOAD")  # written while "being read": not remembered
    cache.remember(before, f.stat(), sha)
    assert cache.known(before) is None and cache.known(f.stat()) is None
    before = f.stat()
    cache.remember(before, f.stat(), sha)
    assert cache.known(f.stat()) == sha
    assert HashCache(tmp_path / "hashes.jsonl").known(f.stat()) is None  # in memory until flushed
    cache.flush()
    assert HashCache(tmp_path / "hashes.jsonl").known(f.stat()) == sha
    fresh = HashCache(tmp_path / "other.jsonl", settle_s=60.0)
    fresh.remember(before, f.stat(), sha)  # modified just now: its stamps are not trusted yet
    assert fresh.known(f.stat()) is None


def test_store_first_log_remembers_settled_files_without_a_second_read(tmp_path: Path, reads: list[Path]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    (src / "small.txt").write_text("small")
    store = LocalStore(tmp_path / "store")
    store._hashes.settle_s = 0.0
    v = store.log("m", "model", src)
    assert reads == []  # the store hashes while it copies, not through a separate hashing pass
    lines = (store.root / "cache" / "hashes.jsonl").read_text().splitlines()
    assert len(lines) == 4  # appended once the files were read, and the stamps of the two blobs placed
    fresh = HashCache(store.root / "cache" / "hashes.jsonl")
    assert all(fresh.known((src / f.path).stat()) == f.sha256 for f in v.files)
