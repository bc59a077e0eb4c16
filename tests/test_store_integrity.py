"""The local store never hands out bytes other than its manifests name, repairs itself, and fails
in one clear line: verified copies for consumers, re-logs that restore lost blobs, damaged records
and unsafe manifests refused, job records with their input versions, and ``fsck --repair``."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.artifacts import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    CorruptArtifact,
    DamagedRecord,
    FileEntry,
    JobCommit,
    LocalStore,
    Producer,
)
from orchestrator.artifacts.hashcache import HashCache
from orchestrator.artifacts.local import manifest_digest

REPO = Path(__file__).resolve().parents[1]
FICLONE = 0x40049409


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_dir(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def blob_of(store: LocalStore, data: bytes) -> Path:
    h = sha(data)
    return store.root / "objects" / h[:2] / h[2:]


def flip_first_byte(path: Path) -> bytes:
    """Damage a file in place, keeping its size (bit rot, or a stage running as root); the new bytes."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def quarantined(store: LocalStore, under: str = "") -> list[bytes]:
    """The contents of every file under the store's quarantine/ (or its folder ``under``)."""
    folder = store.root / "quarantine" / under
    return [p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()] if folder.is_dir() else []


def record_path(store: LocalStore, name: str, number: int) -> Path:
    return store.root / "artifacts" / name / "versions" / f"v{number}" / "version.json"


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


_opened: list[str] | None = None  # paths opened while a test listens (audit hooks cannot be removed)


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def opened_under(root: Path, fn: Callable[[], object]) -> list[str]:
    """The files under ``root`` that ``fn()`` opened, one entry per open."""
    global _opened
    _opened = []
    try:
        fn()
        return sorted(p for p in _opened if Path(p).is_relative_to(root))
    finally:
        _opened = None


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", lock_timeout_s=30)


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------ 1. materialize hands out verified copies


def test_materialize_refuses_corrupt_bytes_and_quarantines_the_blob(store: LocalStore, tmp_path: Path) -> None:
    files = {"a.txt": b"alpha", "d/w.bin": random.Random(1).randbytes(3 << 20)}
    src = make_dir(tmp_path / "src", files)
    v = store.log("x", "t", src)
    blob = blob_of(store, files["d/w.bin"])
    bad = flip_first_byte(blob)
    with pytest.raises(CorruptArtifact) as info:
        store.materialize(v.ref)
    message = one_line(info.value)
    assert "x:v0" in message and "d/w.bin" in message
    assert "submit --force" in message and "fsck --repair" in message
    assert not blob.exists() and quarantined(store) == [bad]  # from now on the blob counts as missing
    assert not (store.root / "materialized" / "x" / "v0").exists()
    assert list((store.root / "tmp").iterdir()) == []
    with pytest.raises(CorruptArtifact, match="missing"):
        store.materialize(v.ref)
    # The producer's rerun logs the same files again, which restores the blob.
    assert store.log("x", "t", src).ref == v.ref
    out = store.materialize(v.ref)
    assert {rel: (out / rel).read_bytes() for rel in files} == files
    assert store.fsck().ok


def test_a_missing_blob_says_how_to_restore_it(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": b"1", "d/b": b"2"}))
    blob_of(store, b"2").unlink()
    with pytest.raises(CorruptArtifact) as info:
        store.materialize(v.ref)
    message = one_line(info.value)
    assert "x:v0" in message and "d/b" in message and "missing" in message
    assert "log the artifact again" not in message and "submit --force" in message and "fsck --repair" in message


def test_the_view_holds_read_only_copies_so_a_stage_cannot_write_to_a_blob(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a.txt": b"alpha", "d/b.txt": b"bee"}))
    out = store.materialize(v.ref)
    view_file, blob = out / "a.txt", blob_of(store, b"alpha")
    assert view_file.stat().st_ino != blob.stat().st_ino and view_file.stat().st_nlink == 1
    assert view_file.stat().st_mode & 0o222 == 0
    assert store.modified_view_files(v.ref) == []
    view_file.chmod(0o644)  # what a stage running as root can do without asking
    view_file.write_text("ALPHA")
    assert blob.read_bytes() == b"alpha"
    assert store.modified_view_files(v.ref) == ["a.txt"]
    folder = out.stat().st_ino
    assert store.materialize(v.ref) == out
    assert view_file.read_text() == "alpha" and view_file.stat().st_mode & 0o222 == 0
    assert out.stat().st_ino == folder  # repaired file by file: the folder was never missing
    assert store.modified_view_files(v.ref) == []


def test_a_write_to_a_shared_input_is_reported_even_once_another_job_repaired_it(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a.txt": b"alpha", "b.txt": b"bee"}))
    job_a, job_b = LocalStore(store.root), LocalStore(store.root)  # two jobs reading the same input
    out = job_a.materialize(v.ref)
    (out / "a.txt").chmod(0o644)
    (out / "a.txt").write_text("ALPHA")  # job a's stage writes to its input, as root
    assert job_b.materialize(v.ref) == out and (out / "a.txt").read_text() == "alpha"  # b gets it repaired
    assert job_b.modified_view_files(v.ref) == []
    assert job_a.modified_view_files(v.ref) == ["a.txt"]  # a's stage may have read its own bytes: still reported


def test_a_verified_view_is_not_read_again_and_a_touched_file_is_copied_alone(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": b"1", "d/b": b"2", "d/e/c": b"3"}))
    out = store.materialize(v.ref)
    assert (store.root / "materialized" / "x" / "v0.verified.json").is_file()
    again = opened_under(store.root, lambda: store.materialize(v.ref))
    assert [p for p in again if "/objects/" in p or Path(p).is_relative_to(out)] == []
    os.utime(out / "d" / "b", ns=(0, 0))  # a changed stamp: the file may have been written to
    assert opened_under(store.root / "objects", lambda: store.materialize(v.ref)) == [str(blob_of(store, b"2"))]
    assert (out / "d" / "b").read_bytes() == b"2"


def test_a_lost_or_damaged_sidecar_means_verifying_again_in_place(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": b"1", "d/b": b"2"}))
    out = store.materialize(v.ref)
    sidecar = out.with_name("v0.verified.json")
    sidecar.write_text('{"files": ')
    assert len(opened_under(store.root / "objects", lambda: store.materialize(v.ref))) == 2
    assert json.loads(sidecar.read_text())
    sidecar.unlink()
    flip_first_byte(blob_of(store, b"2"))
    with pytest.raises(CorruptArtifact, match="d/b"):
        store.materialize(v.ref)
    assert out.is_dir() and (out / "a").read_bytes() == b"1"  # other readers still have their folder


def test_views_built_as_hard_links_by_older_stores_become_copies(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": b"1", "d/b": b"2"}))
    out = store.root / "materialized" / "x" / "v0"
    (out / "d").mkdir(parents=True)
    for f in v.files:
        os.link(store._blob(f.sha256), out / f.path)
    assert store.materialize(v.ref) == out
    for f in v.files:
        assert (out / f.path).stat().st_nlink == 1 and store._blob(f.sha256).stat().st_nlink == 1


def test_files_added_to_a_view_are_reported_and_removed(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": b"1", "d/b": b"2"}))
    out = store.materialize(v.ref)
    (out / "d" / "extra.txt").write_text("written by a stage")
    assert store.modified_view_files(v.ref) == ["d/extra.txt"]
    store.materialize(v.ref)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a", "d/b"]
    assert store.modified_view_files(v.ref) == []


def test_a_view_folder_replaced_by_a_symlink_is_rebuilt_inside_the_store(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": b"1", "d/b": b"2"}))
    out = store.materialize(v.ref)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(out / "d")
    (out / "d").symlink_to(outside)
    assert "d/b" in store.modified_view_files(v.ref)
    store.materialize(v.ref)
    assert not (out / "d").is_symlink() and (out / "d" / "b").read_bytes() == b"2"
    assert list(outside.iterdir()) == []


def test_reflinks_are_tried_first_and_their_bytes_verified(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"big.bin": random.Random(2).randbytes(2 << 20), "small.txt": b"small"}
    v = store.log("x", "t", make_dir(tmp_path / "src", files))
    real = fcntl.ioctl
    clones: list[int] = []

    def cloning(fd: int, request: int, arg: int = 0, *rest: object) -> object:
        if request != FICLONE:
            return real(fd, request, arg, *rest)  # type: ignore[call-overload]
        clones.append(fd)  # as on btrfs/XFS: the new file shares the source's bytes
        size = os.fstat(arg).st_size
        os.pwrite(fd, os.pread(arg, size, 0), 0)
        return 0

    monkeypatch.setattr(fcntl, "ioctl", cloning)
    out = store.materialize(v.ref)
    assert len(clones) == 2
    assert {rel: (out / rel).read_bytes() for rel in files} == files

    def unsupported(fd: int, request: int, arg: int = 0, *rest: object) -> object:
        if request == FICLONE:
            clones.append(fd)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, request, arg, *rest)  # type: ignore[call-overload]

    monkeypatch.setattr(fcntl, "ioctl", unsupported)
    clones.clear()
    v1 = store.log("x", "t", make_dir(tmp_path / "src1", {"big.bin": files["big.bin"][::-1]}))
    out1 = store.materialize(v1.ref)
    assert len(clones) == 1 and (out1 / "big.bin").read_bytes() == files["big.bin"][::-1]  # a plain copy instead


MATERIALIZE = """
import os, sys, time
from pathlib import Path
from orchestrator.artifacts import LocalStore
root, ref, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = LocalStore(root, lock_timeout_s=60)
while not go.exists():
    time.sleep(0.002)
out = store.materialize(ref)
print(out, os.stat(out / "big.bin").st_ino, os.stat(out / "d" / "s.txt").st_ino, flush=True)
"""


def test_concurrent_processes_build_one_view_and_reuse_it(tmp_path: Path) -> None:
    root, go = tmp_path / "store", tmp_path / "go"
    files = {"big.bin": random.Random(3).randbytes(4 << 20), "d/s.txt": b"small"}
    store = LocalStore(root)
    v = store.log("x", "t", make_dir(tmp_path / "src", files))
    procs = [spawn(MATERIALIZE, str(root), "x:v0", str(go)) for _ in range(5)]
    time.sleep(0.3)
    go.touch()
    lines = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        lines.append(out)
    assert len(set(lines)) == 1  # the same files everywhere: built once, nobody copied again
    view = store.materialize(v.ref)
    assert str(view) == lines[0].split()[0]
    assert {rel: (view / rel).read_bytes() for rel in files} == files
    assert list((root / "tmp").iterdir()) == []
    assert store.modified_view_files(v.ref) == []


# --------------------------------------------------------------- 2. a re-log of the same files repairs


@pytest.mark.parametrize("remembered", [True, False], ids=["listing-only", "read-again"])
@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_relogging_the_same_files_repairs_their_blobs(tmp_path: Path, remembered: bool, damage: str) -> None:
    store = LocalStore(tmp_path / "store")
    store._hashes.settle_s = 0.0
    files = {"w.bin": random.Random(4).randbytes(2 << 20), "s.txt": b"small"}
    src = make_dir(tmp_path / "src", files)
    v = store.log("x", "t", src)
    blob = blob_of(store, files["w.bin"])
    if damage == "deleted":
        blob.unlink()
    else:
        flip_first_byte(blob)
    again = src if remembered else make_dir(tmp_path / "copy", files)  # unseen files are read: the digest path
    assert store.log("x", "t", again).ref == v.ref
    assert blob.read_bytes() == files["w.bin"] and blob.stat().st_mode & 0o777 == 0o444
    assert (store.materialize(v.ref) / "w.bin").read_bytes() == files["w.bin"]
    assert len(quarantined(store)) == (damage == "corrupt")
    assert store.fsck().ok
    assert list((store.root / "tmp").iterdir()) == []


def test_a_relog_with_move_may_take_the_source_to_repair(store: LocalStore, tmp_path: Path) -> None:
    files = {"w.bin": random.Random(5).randbytes(2 << 20), "s.txt": b"small"}
    v = store.log("x", "t", make_dir(tmp_path / "a", files))
    blob_of(store, files["w.bin"]).unlink()
    flip_first_byte(blob_of(store, b"small"))
    assert store.log("x", "t", make_dir(tmp_path / "staging", files), move=True).ref == v.ref
    for data in files.values():
        assert blob_of(store, data).read_bytes() == data and blob_of(store, data).stat().st_mode & 0o777 == 0o444
    assert store.fsck().ok


def test_a_new_version_does_not_share_a_corrupt_blob(store: LocalStore, tmp_path: Path) -> None:
    shared = random.Random(6).randbytes(2 << 20)
    store.log("x", "t", make_dir(tmp_path / "a", {"shared.bin": shared, "n": b"0"}))
    flip_first_byte(blob_of(store, shared))
    v1 = store.log("x", "t", make_dir(tmp_path / "b", {"shared.bin": shared, "n": b"1"}))
    assert v1.ref.version == 1 and blob_of(store, shared).read_bytes() == shared
    assert (store.materialize("x:v0") / "shared.bin").read_bytes() == shared
    assert store.fsck().ok


def test_a_relog_reads_no_blob_whose_stamp_is_remembered(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = LocalStore(root)
    first._hashes.settle_s = 0.0
    src = make_dir(tmp_path / "src", {f"d{i % 3}/f{i}": f"content {i}".encode() for i in range(30)})
    v = first.log("x", "t", src)
    blobs = sorted(str(first._blob(f.sha256)) for f in v.files)
    fresh = LocalStore(root)  # another process: the stamps come from the cache file
    assert opened_under(root / "objects", lambda: fresh.log("x", "t", src)) == []
    (root / "cache" / "hashes.jsonl").unlink()  # as in a store written before blob stamps were kept
    older = LocalStore(root)
    older._hashes.settle_s = 0.0
    assert opened_under(root / "objects", lambda: older.log("x", "t", src)) == blobs  # each verified once
    assert opened_under(root / "objects", lambda: LocalStore(root).log("x", "t", src)) == []


def test_the_store_remembers_its_own_blobs_without_the_settle_delay(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"payload")
    cache = HashCache(tmp_path / "hashes.jsonl", settle_s=60.0)
    cache.remember(f.stat(), f.stat(), sha(b"payload"))
    assert cache.known(f.stat()) is None  # a source file written just now: not trusted yet
    cache.remember_verified(f.stat(), sha(b"payload"))
    assert cache.known(f.stat()) == sha(b"payload")
    cache.flush()
    assert HashCache(tmp_path / "hashes.jsonl").known(f.stat()) == sha(b"payload")


# ----------------------------------------------------------- 3. damaged records: one line, and logging goes on

DAMAGES: dict[str, Callable[[str], str]] = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not-json": lambda text: "not json at all",
    "a list": lambda text: "[]",
    "missing-files": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "files"}),
    "files-not-a-list": lambda text: json.dumps({**json.loads(text), "files": "f"}),
    "bad-file-digest": lambda text: json.dumps(
        {**json.loads(text), "files": [{"path": "f", "sha256": "../../../etc/hostname", "size": 1}]}
    ),
    "bad-producer": lambda text: json.dumps({**json.loads(text), "producer": {"job_key": 3}}),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_version_record_is_one_clear_error_and_logging_goes_on(store: LocalStore, tmp_path: Path, damage: str) -> None:
    v0 = store.log("x", "t", make_dir(tmp_path / "a", {"f": b"0"}))
    store.log("x", "t", make_dir(tmp_path / "b", {"f": b"1"}))
    record = record_path(store, "x", 1)
    record.write_text(DAMAGES[damage](record.read_text()))
    for read in (lambda: store.get("x:v1"), lambda: store.get("x:latest"), lambda: store.versions("x")):
        with pytest.raises(DamagedRecord) as info:
            read()
        message = one_line(info.value)
        assert str(record) in message and "fsck --repair" in message
    with pytest.raises(DamagedRecord):
        store.materialize("x:v1")
    assert store.get("x:v0").digest == v0.digest
    assert store.names() == ["x"]
    assert store.log("x", "t", tmp_path / "a").ref == v0.ref  # intact versions are still found
    again = LocalStore(store.root).log("x", "t", tmp_path / "b")  # the damaged one's content: a new version
    assert again.ref == ArtifactRef("x", 2)
    assert "damaged" not in json.dumps(store.get("x:v2").metadata)


def test_a_damaged_first_version_does_not_block_the_type_check(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    store.log("x", "mask", make_dir(tmp_path / "a", {"f": b"0"}))
    store.log("x", "mask", make_dir(tmp_path / "b", {"f": b"1"}))
    record_path(store, "x", 0).write_text("{")
    fresh = LocalStore(root)  # nothing cached: the type comes from the first readable version
    assert fresh.log("x", "mask", make_dir(tmp_path / "c", {"f": b"2"})).ref.version == 2
    with pytest.raises(ArtifactError, match="has type 'mask'"):
        LocalStore(root).log("x", "metrics", make_dir(tmp_path / "d", {"f": b"3"}))


def test_damaged_aliases_are_one_clear_error_and_the_next_log_repairs_them(store: LocalStore, tmp_path: Path) -> None:
    store.log("x", "t", make_dir(tmp_path / "a", {"f": b"0"}), aliases=["best"])
    path = store.root / "artifacts" / "x" / "aliases.json"
    path.write_text('{"best": "v0"')
    for ref in ("x:best", "x:v0"):
        with pytest.raises(DamagedRecord) as info:
            store.get(ref)
        assert str(path) in one_line(info.value) and "fsck --repair" in str(info.value)
    v1 = store.log("x", "t", make_dir(tmp_path / "b", {"f": b"1"}), aliases=["best"])
    assert store.get("x:best").ref == v1.ref
    assert quarantined(store) == [b'{"best": "v0"']
    path.write_text("[]")
    assert store.log("x", "t", make_dir(tmp_path / "c", {"f": b"2"})).ref.version == 2  # also without aliases


@pytest.mark.parametrize(
    "text",
    [
        '{"outputs": {"out": "a:v0"',
        "",
        "[]",
        '{"job_key": "job1"}',
        '{"outputs": {"out": 3}}',
        '{"outputs": {"out": "a:latest"}}',
        '{"outputs": {"out": "a:v0"}, "inputs": {"m": "a:v0"}}',
    ],
    ids=["truncated", "empty", "list", "no-outputs", "not-a-ref", "alias-not-version", "inputs-not-a-list"],
)
def test_a_damaged_job_record_is_one_clear_error(store: LocalStore, tmp_path: Path, text: str) -> None:
    a = store.log("a", "t", make_dir(tmp_path / "a", {"f": b"1"}))
    path = store.root / "jobs" / "job1.json"
    path.write_text(text)
    for read in (store.job_outputs, store.job_record):
        with pytest.raises(DamagedRecord) as info:
            read("job1")
        assert str(path) in one_line(info.value) and "fsck --repair" in str(info.value)
    problem = store.job_problem("job1")
    assert problem is not None and str(path) in problem
    store.record_job("job1", {"out": a.ref})  # a rerun records it again
    assert store.job_problem("job1") is None


def test_a_job_whose_outputs_are_gone_is_not_committed(store: LocalStore, tmp_path: Path) -> None:
    a = store.log("a", "t", make_dir(tmp_path / "a", {"f": b"1", "g": b"2"}))
    store.record_job("job1", {"out": a.ref})
    assert store.job_problem("job1") is None
    blob_of(store, b"2").unlink()
    assert store.job_outputs("job1") == {"out": a.ref}
    problem = store.job_problem("job1")
    assert problem is not None and "a:v0" in problem and "g" in problem
    (store.root / "jobs" / "job2.json").write_text(json.dumps({"job_key": "job2", "outputs": {"out": "a:v7"}}))
    assert store.job_outputs("job2") == {"out": ArtifactRef("a", 7)}
    assert "a:v7" in (store.job_problem("job2") or "")
    assert store.job_problem("never-ran") is not None


# -------------------------------------------------------------------- 4. manifest paths stay in the view

UNSAFE_PATHS = ["../../../escaped", "/tmp/absolute", "a\x00b", "", ".", "..", "d/../../../escaped", "d//f", "./f", "d/"]


@pytest.mark.parametrize("bad", UNSAFE_PATHS)
def test_manifest_paths_that_leave_the_view_are_refused(store: LocalStore, tmp_path: Path, bad: str) -> None:
    store.log("x", "t", make_dir(tmp_path / "src", {"ok.txt": b"fine", "f": b"payload"}))
    path = record_path(store, "x", 0)
    record = json.loads(path.read_text())
    record["files"] = [{**f, "path": bad} if f["path"] == "f" else f for f in record["files"]]
    record["digest"] = manifest_digest([FileEntry(**f) for f in record["files"]])  # consistent, apart from the path
    path.write_text(json.dumps(record, sort_keys=True, separators=(",", ":")))
    for call in (lambda: store.get("x:v0"), lambda: store.materialize("x:v0")):
        with pytest.raises(DamagedRecord) as info:
            call()
        message = one_line(info.value)
        assert str(path) in message and repr(bad) in message
    assert not (tmp_path / "escaped").exists() and not (store.root / "materialized" / "x" / "v0").exists()
    report = store.fsck()
    assert not report.ok and any(repr(bad) in line for line in report.damaged)
    store.fsck(repair=True)
    assert store.versions("x") == [] and store.fsck().ok


# ------------------------------------------------------------------ 5. job records carry input versions


def test_job_records_carry_the_input_versions_consumed(store: LocalStore, tmp_path: Path) -> None:
    a0 = store.log("a", "t", make_dir(tmp_path / "a0", {"f": b"0"})).ref
    a1 = store.log("a", "t", make_dir(tmp_path / "a1", {"f": b"1"})).ref
    b = store.log("b", "t", make_dir(tmp_path / "b", {"f": b"b"})).ref
    out = store.log("c", "t", make_dir(tmp_path / "c", {"f": b"c"})).ref
    store.record_job("job1", {"out": out}, inputs={"model": [a1], "data": (a0, b)})
    record = json.loads((store.root / "jobs" / "job1.json").read_text())
    assert record["inputs"] == {"data": ["a:v0", "b:v0"], "model": ["a:v1"]}
    assert record["outputs"] == {"out": "c:v0"} and record["recorded_at"]
    commit = store.job_record("job1")
    assert commit == JobCommit(outputs={"out": out}, inputs={"data": (a0, b), "model": (a1,)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        commit.inputs = None  # type: ignore[misc]
    assert store.job_outputs("job1") == {"out": out}
    (store.root / "jobs" / "old.json").write_text(json.dumps({"job_key": "old", "outputs": {"out": "c:v0"}}, indent=1))
    assert store.job_record("old") == JobCommit(outputs={"out": out}, inputs=None)  # written before inputs were
    assert store.job_record("never") is None
    with pytest.raises(ArtifactNotFound, match="v9"):
        store.record_job("job2", {"out": out}, inputs={"m": [ArtifactRef("a", 9)]})
    store.drop_job("job1")
    assert store.job_record("job1") is None and len(quarantined(store)) == 1
    store.drop_job("job1")  # nothing left to drop
    assert {"job_record", "job_problem", "drop_job", "modified_view_files"} <= ArtifactStore.__abstractmethods__


# ---------------------------------------------------------------------------------- 6. fsck --repair


def lineage_store(root: Path, src: Path) -> LocalStore:
    """a -> b -> c, and d alone, recorded as the runner records them (c's record in the old format,
    without inputs: its producer's inputs stand in)."""
    store = LocalStore(root)
    refs: dict[str, ArtifactRef] = {}
    for name, upstream in (("a", None), ("b", "a"), ("c", "b"), ("d", None)):
        inputs = (refs[upstream],) if upstream else ()
        producer = Producer(job_key=f"j{name}", study="s", stage=name, job_label=name, inputs=inputs)
        refs[name] = store.log(name, "t", make_dir(src / name, {"f": name.encode()}), producer=producer, aliases=["best"]).ref
    store.record_job("ja", {"out": refs["a"]}, inputs={})
    store.record_job("jb", {"out": refs["b"]}, inputs={"x": [refs["a"]]})
    (root / "jobs" / "jc.json").write_text(json.dumps({"job_key": "jc", "outputs": {"out": "c:v0"}}, indent=1))
    store.record_job("jd", {"out": refs["d"]}, inputs={})
    return store


def keys(lines: list[str]) -> list[str]:
    return sorted(line.split(":")[0] for line in lines)


def test_fsck_repair_quarantines_a_corrupt_blob_and_drops_exactly_the_jobs_built_on_it(tmp_path: Path) -> None:
    store = lineage_store(tmp_path / "store", tmp_path / "src")
    assert store.fsck().ok
    blob = blob_of(store, b"a")
    bad = flip_first_byte(blob)
    report = store.fsck()
    assert report.corrupt == [f"a:v0: blob of f is missing or corrupt ({blob})"]
    assert keys(report.dangling_jobs) == ["ja"] and keys(report.stale_jobs) == ["jb", "jc"]
    assert not report.ok and blob.exists()  # a report changes nothing
    assert all(store.job_record(k) is not None for k in ("ja", "jb", "jc", "jd"))
    report = store.fsck(repair=True)
    assert not blob.exists() and quarantined(store, "objects") == [bad]
    assert len(quarantined(store, "jobs")) == 3
    assert keys(report.dropped_jobs) == ["ja", "jb", "jc"] and len(report.quarantined) == 1
    assert report.repaired and report.unrepaired == []
    assert [k for k in ("ja", "jb", "jc", "jd") if store.job_record(k) is not None] == ["jd"]
    assert store.log("a", "t", tmp_path / "src" / "a").ref == ArtifactRef("a", 0)  # the producer reruns
    assert store.fsck().ok


def test_fsck_repair_moves_damaged_records_to_quarantine(tmp_path: Path) -> None:
    store = lineage_store(tmp_path / "store", tmp_path / "src")
    b_record = record_path(store, "b", 0)
    b_record.write_text("{")
    aliases = store.root / "artifacts" / "d" / "aliases.json"
    aliases.write_text("[1")
    (store.root / "jobs" / "jx.json").write_text("{")
    report = store.fsck()
    assert keys(report.damaged) == ["artifacts/b/versions/v0/version.json", "artifacts/d/aliases.json", "jobs/jx.json"]
    assert keys(report.dangling_jobs) == ["jb"] and keys(report.stale_jobs) == ["jc"]
    report = store.fsck(repair=True)
    assert keys(report.dropped_jobs) == ["jb", "jc", "jx"] and len(report.quarantined) == 2  # (and the job records)
    assert report.repaired and report.unrepaired == []
    assert [k for k in ("ja", "jb", "jc", "jd", "jx") if store.job_record(k) is not None] == ["ja", "jd"]
    assert store.versions("b") == [] and store.get("d:v0").aliases == ("latest",)
    again = store.log("b", "t", make_dir(tmp_path / "b2", {"f": b"b2"}))
    assert again.ref == ArtifactRef("b", 1)  # v0 named other bytes once: its number is never reused
    assert store.fsck().ok


def test_fsck_never_creates_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ArtifactNotFound) as info:
        LocalStore(missing, create=False)
    assert str(missing) in one_line(info.value)
    assert cli.main(["fsck", "--store", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()


def test_cli_fsck_repair_says_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    store = lineage_store(root / "artifacts", tmp_path / "src")
    flip_first_byte(blob_of(store, b"b"))
    (root / "artifacts" / "jobs" / "jx.json").write_text("{")
    assert cli.main(["fsck", "--store", str(root)]) == 1
    check = capsys.readouterr()
    assert "CORRUPT b:v0" in check.out and "jobs/jx.json" in check.out and "Traceback" not in check.out + check.err
    assert cli.main(["fsck", "--store", str(root), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "QUARANTINED" in out and "DROPPED job record jb" in out and "DROPPED job record jc" in out
    assert "DROPPED job record ja" not in out and "store repaired" in out
    store.log("b", "t", tmp_path / "src" / "b")
    assert cli.main(["fsck", "--store", str(root)]) == 0 and "store ok" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["name\n", "a:v1\n"], ids=["artifact-name", "reference"])
def test_names_and_references_with_a_trailing_newline_are_refused(store: LocalStore, tmp_path: Path, bad: str) -> None:
    """``$`` matches before a final newline: every name pattern is anchored with ``\\Z``."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    with pytest.raises(ArtifactError):
        if ":" in bad:
            ArtifactRef.parse(bad)
        else:
            store.log(bad, "t", src)
    with pytest.raises(ArtifactError):
        store.record_job("k" * 64 + "\n", {})
