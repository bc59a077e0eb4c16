"""``artifacts.adopt``: committing another store's version under its own number and record.

Real stores on disk throughout; the crash tests kill a real process with SIGKILL at a chosen step
(the child blocks there and says so through a file, so the kill lands exactly there every time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.artifacts import ArtifactNotFound, ArtifactRef, CorruptArtifact, LocalStore, Producer
from orchestrator.artifacts.adopt import AdoptConflict, adopt, adopt_job

ROOT = Path(__file__).resolve().parent.parent


def source_version(tmp: Path, files: dict[str, bytes], *, name: str = "demo.emit", logs: int = 1) -> tuple[ArtifactRef, dict[str, Any], Path]:
    """A version logged ``logs`` times with growing content in a source store (so its number is
    ``logs - 1``): its ref, its raw version.json, and a folder holding its files."""
    src_store = LocalStore(tmp / "source-store")
    folder = tmp / f"files-{name}-{logs}"
    for k in range(logs):
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data + (b"" if k == logs - 1 else f"#{k}".encode()))
        version = src_store.log(name, "number", folder, metadata={"k": k}, producer=Producer("job1", "demo", "emit", "emit[x]"))
    record = json.loads((src_store.root / "artifacts" / name / "versions" / f"v{version.ref.version}" / "version.json").read_text())
    return version.ref, record, folder


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


def test_adopt_keeps_number_and_record(tmp_path: Path) -> None:
    ref, record, folder = source_version(tmp_path, {"value.json": b'{"value": 3}', "sub/b.bin": b"\0" * 2000}, logs=3)
    assert ref.version == 2
    store = LocalStore(tmp_path / "store")
    assert adopt(store, ref, record, folder) is True
    got = store.get(ref)
    assert (got.ref, got.digest, got.metadata, got.created_at) == (ref, record["digest"], record["metadata"], record["created_at"])
    assert got.producer is not None and got.producer.job_key == "job1"
    assert json.loads((store.root / "artifacts" / ref.name / "versions" / "v2" / "version.json").read_text()) == record
    assert tree(store.materialize(ref)) == tree(folder)
    assert store.fsck().ok
    before = tree(store.root)
    assert adopt(store, ref, record, folder) is False  # same digest: a no-op
    assert tree(store.root) == before
    assert store.log(ref.name, "number", folder).ref == ref  # the store's own log finds it by digest
    (folder / "value.json").chmod(0o644)
    (folder / "value.json").write_bytes(b'{"value": 4}')
    assert store.log(ref.name, "number", folder).ref.version == 3  # numbering goes on after it


def test_conflicting_number_is_refused(tmp_path: Path) -> None:
    ref, record, folder = source_version(tmp_path, {"value.json": b"theirs"})
    store = LocalStore(tmp_path / "store")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "value.json").write_bytes(b"mine")
    assert store.log(ref.name, "number", mine).ref == ref  # v0 here is other content
    before = tree(store.root)
    with pytest.raises(AdoptConflict, match=r"already has demo\.emit:v0 with digest .* nothing was overwritten"):
        adopt(store, ref, record, folder)
    assert tree(store.root) == before
    assert not os.listdir(store.root / "tmp")


def test_files_not_matching_the_record_are_refused(tmp_path: Path) -> None:
    ref, record, folder = source_version(tmp_path, {"value.json": b"good", "other.txt": b"x"})
    store = LocalStore(tmp_path / "store")
    (folder / "value.json").chmod(0o644)
    (folder / "value.json").write_bytes(b"evil")
    with pytest.raises(CorruptArtifact, match=r"file 'value.json' has sha256 .* nothing was stored"):
        adopt(store, ref, record, folder)
    (folder / "extra").write_bytes(b"")
    (folder / "value.json").write_bytes(b"good")
    with pytest.raises(CorruptArtifact, match="'extra' is not in its record"):
        adopt(store, ref, record, folder)
    (folder / "extra").unlink()
    (folder / "other.txt").unlink()
    with pytest.raises(CorruptArtifact, match="files missing: other.txt"):
        adopt(store, ref, record, folder)
    assert not list((store.root / "objects").rglob("*/*")) and not os.listdir(store.root / "tmp")
    assert store._version_numbers(ref.name) == []


def test_retired_number_and_bad_record_are_refused(tmp_path: Path) -> None:
    ref, record, folder = source_version(tmp_path, {"value.json": b"v"})
    store = LocalStore(tmp_path / "store")
    with pytest.raises(Exception, match="digest does not match its file list"):
        adopt(store, ref, {**record, "digest": "0" * 64}, folder)
    vdir = store.root / "artifacts" / ref.name / "versions"
    vdir.mkdir(parents=True)
    (vdir / "v0.retired").write_text("retired\n")
    with pytest.raises(AdoptConflict, match="retired by fsck"):
        adopt(store, ref, record, folder)


def test_present_version_with_lost_blob_is_repaired(tmp_path: Path) -> None:
    ref, record, folder = source_version(tmp_path, {"value.json": b"keep me"})
    store = LocalStore(tmp_path / "store")
    adopt(store, ref, record, folder)
    blob = store._blob(record["files"][0]["sha256"])
    blob.chmod(0o644)
    blob.unlink()
    assert adopt(store, ref, record, folder) is False
    assert blob.read_bytes() == b"keep me"


def test_adopt_job_writes_the_record_exactly(tmp_path: Path) -> None:
    ref, record, folder = source_version(tmp_path, {"value.json": b"1"})
    store = LocalStore(tmp_path / "store")
    job = {"job_key": "k1", "outputs": {"number": str(ref)}, "inputs": {}, "recorded_at": "2026-01-01T00:00:00+00:00"}
    with pytest.raises(ArtifactNotFound):
        adopt_job(store, "k1", job)  # its output is not there yet
    assert not store._job_path("k1").exists()
    adopt(store, ref, record, folder)
    assert adopt_job(store, "k1", job) is True
    assert json.loads(store._job_path("k1").read_text()) == job
    assert store.job_problem("k1") is None and store.job_outputs("k1") == {"number": ref}
    assert adopt_job(store, "k1", {**job, "recorded_at": "later"}) is False  # same outputs and inputs
    with pytest.raises(AdoptConflict, match="records other outputs"):
        adopt_job(store, "k1", {**job, "inputs": {"x": [str(ref)]}})
    assert json.loads(store._job_path("k1").read_text()) == job


CHILD = """
import json, sys, time
from pathlib import Path
import orchestrator.artifacts.adopt as adopt_mod
from orchestrator.artifacts import ArtifactRef, LocalStore
from orchestrator.artifacts.ingest import BlobWriter

store_dir, record_file, folder, point, signal_file = sys.argv[1:]

def block(*args, **kwargs):
    Path(signal_file).write_text("here")
    time.sleep(600)

if point == "ingested":  # temporary blobs written, nothing placed
    BlobWriter.place_all = block
else:  # "staged": blobs placed, version.json staged, the commit rename not done
    adopt_mod._commit = block
record = json.loads(Path(record_file).read_text())
adopt_mod.adopt(LocalStore(store_dir), ArtifactRef.parse(record.pop("__ref")), record, Path(folder))
"""


@pytest.mark.parametrize("point", ["ingested", "staged"])
def test_sigkill_leaves_only_tmp_garbage(tmp_path: Path, point: str) -> None:
    ref, record, folder = source_version(tmp_path, {"value.json": b"x" * 10, "big.bin": os.urandom(3 << 20)}, logs=2)
    store_dir = tmp_path / "store"
    LocalStore(store_dir)
    record_file, signal_file = tmp_path / "record.json", tmp_path / "signal"
    record_file.write_text(json.dumps({**record, "__ref": str(ref)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(store_dir), str(record_file), str(folder), point, str(signal_file)],
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not signal_file.exists():
            assert child.poll() is None, "the child ended before reaching the crash point"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    store = LocalStore(store_dir)
    leftovers = os.listdir(store_dir / "tmp")
    assert leftovers, "the kill should have left staging garbage behind"
    assert not (store_dir / "artifacts" / ref.name / "versions" / f"v{ref.version}").exists()
    with pytest.raises(ArtifactNotFound):
        store.get(ref)
    report = store.fsck()
    assert sorted(report.removed_temp) == sorted(leftovers) and report.ok
    assert not os.listdir(store_dir / "tmp")
    assert adopt(store, ref, record, folder) is True  # a rerun commits it
    assert tree(store.materialize(ref)) == tree(folder)
    assert store.fsck().ok
