"""Tests of the local directory artifact store and its file lock."""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from orchestrator import fsutil
from orchestrator.artifacts import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactVersion,
    CorruptArtifact,
    FileEntry,
    FsckReport,
    LocalStore,
    LockTimeout,
    Producer,
    file_lock,
    local,
    views,
)
from orchestrator.artifacts.local import manifest_digest

REPO = Path(__file__).resolve().parents[1]


def gen_content(seed: int) -> dict[str, bytes]:
    """The files of version ``seed`` of the big artifact (also run in the child processes)."""
    rng = random.Random(seed)
    return {
        "a.bin": rng.randbytes(600_000 + rng.randrange(1000)),
        "sub/b.txt": f"seed {seed}".encode(),
        "sub/deep/c.bin": rng.randbytes(150_000),
    }


def write_content(src: Path, seed: int) -> None:
    for rel, data in gen_content(seed).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)


GEN_SRC = "import random\nfrom pathlib import Path\n\n" + "\n".join(
    inspect.getsource(f) for f in (gen_content, write_content)
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_dir(path: Path, files: dict[str, bytes | str]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def count_blobs(store: LocalStore) -> int:
    return sum(1 for p in (store.root / "objects").rglob("*") if p.is_file())


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", lock_timeout_s=30)


# ---------------------------------------------------------------------------- round trip


def test_log_and_get_round_trip(store: LocalStore, tmp_path: Path) -> None:
    files = {"b.txt": "bee", "a/z.txt": "zed", "a.txt": b"\x00\x01"}
    src = make_dir(tmp_path / "src", files)
    producer = Producer(
        job_key="abc123",
        study="demo",
        stage="prune",
        job_label="language=en",
        inputs=(ArtifactRef("demo.encode", 2), ArtifactRef("demo.model", 0)),
        provenance={"seed": 1, "git": "deadbeef", "packages": {"torch": "2.3"}},
    )
    logged = store.log(
        "demo.prune.language=en", "head-mask", src,
        metadata={"sparsity": 0.5, "layers": [1, 2]}, aliases=["best"], producer=producer,
    )  # fmt: skip
    got = store.get("demo.prune.language=en:v0")
    assert got == logged
    assert got.ref == ArtifactRef("demo.prune.language=en", 0)
    assert got.type == "head-mask"
    assert [f.path for f in got.files] == ["a.txt", "a/z.txt", "b.txt"]
    expected = {rel: (data.encode() if isinstance(data, str) else data) for rel, data in files.items()}
    for f in got.files:
        assert f.sha256 == sha(expected[f.path])
        assert f.size == len(expected[f.path])
    assert got.size == 3 + 3 + 2
    rows = sorted([f.path, f.sha256, f.size] for f in got.files)
    assert got.digest == sha(json.dumps(rows, separators=(",", ":")).encode())
    assert got.metadata == {"sparsity": 0.5, "layers": [1, 2]}
    assert got.producer == producer
    assert got.aliases == ("latest", "best")
    created = datetime.fromisoformat(got.created_at)
    assert created.utcoffset() == timedelta(0)
    assert abs((datetime.now(created.tzinfo) - created).total_seconds()) < 60
    assert store.get(ArtifactRef("demo.prune.language=en", 0)) == got
    assert store.get("demo.prune.language=en:latest") == got
    assert store.get("demo.prune.language=en:best") == got
    assert store.names() == ["demo.prune.language=en"]


def test_versions_numbered_in_order_and_latest_moves(store: LocalStore, tmp_path: Path) -> None:
    for i in range(3):
        store.log("m", "metrics", make_dir(tmp_path / f"s{i}", {"m.json": f"{i}"}), metadata={"i": i})
    versions = store.versions("m")
    assert [v.ref.version for v in versions] == [0, 1, 2]
    assert [v.metadata["i"] for v in versions] == [0, 1, 2]
    assert [v.aliases for v in versions] == [(), (), ("latest",)]
    assert store.get("m:latest").ref == ArtifactRef("m", 2)
    assert store.versions("unknown") == []


def test_custom_alias_moves_and_is_unique(store: LocalStore, tmp_path: Path) -> None:
    store.log("m", "t", make_dir(tmp_path / "a", {"f": "1"}), aliases=["best", "first"])
    store.log("m", "t", make_dir(tmp_path / "b", {"f": "2"}), aliases=["best"])
    store.log("m", "t", make_dir(tmp_path / "c", {"f": "3"}))
    assert [v.aliases for v in store.versions("m")] == [("first",), ("best",), ("latest",)]
    assert store.get("m:best").ref.version == 1
    assert store.get("m:first").ref.version == 0


def test_identical_content_is_stored_once(store: LocalStore, tmp_path: Path) -> None:
    big = random.Random(0).randbytes(100_000)
    first = store.log("x", "t", make_dir(tmp_path / "a", {"big.bin": big, "n": "1"}), metadata={"k": 1})
    assert count_blobs(store) == 2
    again = store.log(
        "x", "t", make_dir(tmp_path / "b", {"big.bin": big, "n": "1"}), metadata={"k": 2}, aliases=["prod"]
    )
    assert again.ref == first.ref
    assert again.metadata == {"k": 1}  # the existing version is returned unchanged
    assert again.aliases == ("latest", "prod")
    assert len(store.versions("x")) == 1
    assert count_blobs(store) == 2
    changed = store.log("x", "t", make_dir(tmp_path / "c", {"big.bin": big, "n": "2"}))
    assert changed.ref.version == 1
    assert count_blobs(store) == 3  # only the changed file is new
    # Re-logging v0's content after v1 returns v0; latest stays at the newest version.
    back = store.log("x", "t", tmp_path / "a")
    assert back.ref.version == 0
    assert store.get("x:latest").ref.version == 1
    other = store.log("y", "t", tmp_path / "a")
    assert other.ref == ArtifactRef("y", 0)
    assert other.digest == first.digest
    assert count_blobs(store) == 3
    blob = store.root / "objects" / sha(big)[:2] / sha(big)[2:]
    assert blob.read_bytes() == big
    assert blob.stat().st_mode & 0o777 == 0o444


def test_records_in_the_older_indented_format_still_work(store: LocalStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "a", {"f": "1", "d/g": "2"})
    v0 = store.log("x", "t", src, metadata={"k": 1})
    record = store.root / "artifacts" / "x" / "versions" / "v0" / "version.json"
    record.write_text(json.dumps(json.loads(record.read_text()), sort_keys=True, indent=1))  # as stores wrote it before
    again = LocalStore(store.root)
    assert again.get("x:v0") == v0
    assert again.log("x", "t", src).ref == v0.ref  # its digest is found: deduplicated
    record.write_text(json.dumps(json.loads(record.read_text())))  # keys unsorted: the whole record is read
    assert LocalStore(store.root).log("x", "t", src).ref == v0.ref
    assert again.fsck().ok


def test_type_mismatch_is_an_error(store: LocalStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "a", {"f": "1"})
    store.log("x", "head-mask", src)
    blobs = count_blobs(store)
    with pytest.raises(ArtifactError, match="has type 'head-mask', cannot log type 'metrics'"):
        store.log("x", "metrics", src)
    with pytest.raises(ArtifactError, match="has type 'head-mask'"):
        store.log("x", "metrics", make_dir(tmp_path / "b", {"f": "2"}))
    assert len(store.versions("x")) == 1
    assert count_blobs(store) == blobs  # refused before writing anything


@pytest.mark.parametrize("name", ["", "has space", "-lead", ".hidden", "a/b", "a:b", "x" * 129])
def test_bad_names_are_rejected(store: LocalStore, tmp_path: Path, name: str) -> None:
    with pytest.raises(ArtifactError, match="invalid artifact name"):
        store.log(name, "t", make_dir(tmp_path / "a", {"f": "1"}))
    assert store.names() == []


def test_bad_aliases_sources_and_metadata(store: LocalStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "a", {"f": "1"})
    for alias in ["v3", "has space", "a:b", ""]:
        with pytest.raises(ArtifactError, match="invalid alias"):
            store.log("x", "t", src, aliases=[alias])
    with pytest.raises(ArtifactError, match="not a directory"):
        store.log("x", "t", tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="holds no files"):
        store.log("x", "t", tmp_path / "empty")
    with pytest.raises(ArtifactError, match="not JSON-serialisable"):
        store.log("x", "t", src, metadata={"obj": object()})
    assert store.names() == []
    assert count_blobs(store) == 0  # everything is checked before any blob is written


def test_symlinks(store: LocalStore, tmp_path: Path) -> None:
    target = make_dir(tmp_path / "elsewhere", {"real.txt": "real content"})
    src = make_dir(tmp_path / "src", {"own.txt": "own"})
    (src / "link.txt").symlink_to(target / "real.txt")
    v = store.log("x", "t", src)
    assert {f.path: f.sha256 for f in v.files} == {"link.txt": sha(b"real content"), "own.txt": sha(b"own")}
    (src / "dirlink").symlink_to(target)
    with pytest.raises(ArtifactError, match="symlinked directory"):
        store.log("x", "t", src)
    (src / "dirlink").unlink()
    (src / "broken").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="broken symlink"):
        store.log("x", "t", src)


def test_not_found_messages(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFound, match="no artifact named 'x'.*artifacts: none"):
        store.get("x:v0")
    store.log("x", "t", make_dir(tmp_path / "a", {"f": "1"}), aliases=["best"])
    store.log("x", "t", make_dir(tmp_path / "b", {"f": "2"}))
    with pytest.raises(ArtifactNotFound, match=r"no artifact named 'y'.*artifacts: x"):
        store.get("y:latest")
    with pytest.raises(ArtifactNotFound, match=r"'x' has no version or alias 'v7'; versions: v0, v1;"):
        store.get(ArtifactRef("x", 7))
    with pytest.raises(ArtifactNotFound, match=r"no version or alias 'prod'.*aliases: latest, best"):
        store.get("x:prod")
    with pytest.raises(ArtifactError, match="expected NAME:vN or NAME:ALIAS"):
        store.get("x")
    with pytest.raises(ArtifactError, match="invalid artifact name"):
        store.get("bad name:v0")


# --------------------------------------------------------------------------- materialize


def test_materialize_is_read_only_copy_of_content(store: LocalStore, tmp_path: Path) -> None:
    files = {"a.txt": "alpha", "d/e/f.bin": bytes(range(256)), "d/g.txt": "gee"}
    v = store.log("x", "t", make_dir(tmp_path / "src", files))
    path = store.materialize(v.ref)
    assert path == store.root / "materialized" / "x" / "v0"
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert found == ["a.txt", "d/e/f.bin", "d/g.txt"]
    for rel, data in files.items():
        assert (path / rel).read_bytes() == (data.encode() if isinstance(data, str) else data)
        assert (path / rel).stat().st_mode & 0o222 == 0
    if os.geteuid() != 0:
        with pytest.raises(PermissionError):
            (path / "a.txt").write_text("overwrite")
    assert store.materialize("x:latest") == path
    assert list((store.root / "tmp").iterdir()) == []


def test_materialize_names_a_missing_blob(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": "1", "d/b": "2"}))
    blob = store._blob(sha(b"2"))
    blob.unlink()
    with pytest.raises(CorruptArtifact, match=r"x:v0 is corrupt: file 'd/b': its stored bytes \(blob\) are missing.*submit --force"):
        store.materialize(v.ref)


def test_materialize_losing_the_race_uses_the_winner(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": "1", "b": "2"}))
    real = views.Views._copy_all
    raced: list[bool] = []

    def racing(self: views.Views, version: ArtifactVersion, jobs: list[tuple[FileEntry, str]]) -> None:
        if not raced:  # a writer that takes no lock (an older store) finishes first, mid-way through our build
            raced.append(True)
            winner = store.root / "materialized" / "x" / "v0"
            winner.mkdir(parents=True)
            for f in version.files:
                shutil.copyfile(store._blob(f.sha256), winner / f.path)
        real(self, version, jobs)

    monkeypatch.setattr(views.Views, "_copy_all", racing)
    path = store.materialize(v.ref)
    assert raced
    assert path == store.root / "materialized" / "x" / "v0"
    assert (path / "a").read_text() == "1" and (path / "a").stat().st_mode & 0o222 == 0  # theirs, verified
    assert store.modified_view_files(v.ref) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_materialize_from_many_threads(store: LocalStore, tmp_path: Path) -> None:
    refs = [store.log("x", "t", make_dir(tmp_path / f"s{i}", {"f": str(i)})).ref for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(store.materialize, refs * 6))
    assert paths == [store.root / "materialized" / "x" / f"v{r.version}" for r in refs] * 6
    assert [(p / "f").read_text() for p in paths[:4]] == ["0", "1", "2", "3"]


# --------------------------------------------------------------------------- job records


def test_job_records(store: LocalStore, tmp_path: Path) -> None:
    a = store.log("a", "t", make_dir(tmp_path / "a", {"f": "1"})).ref
    b = store.log("b", "t", make_dir(tmp_path / "b", {"f": "2"})).ref
    assert store.job_outputs("0123abcd") is None
    store.record_job("0123abcd", {"mask": a, "metrics": b})
    assert store.job_outputs("0123abcd") == {"mask": ArtifactRef("a", 0), "metrics": ArtifactRef("b", 0)}
    store.record_job("0123abcd", {"mask": a})  # a rerun replaces the record
    assert store.job_outputs("0123abcd") == {"mask": a}
    with pytest.raises(ArtifactNotFound, match="no version or alias 'v5'"):
        store.record_job("feed", {"mask": ArtifactRef("a", 5)})
    assert store.job_outputs("feed") is None
    for bad in ["../etc/passwd", "", "a/b", ".hidden"]:
        with pytest.raises(ArtifactError, match="invalid job key"):
            store.record_job(bad, {})
    assert sorted(p.name for p in (store.root / "jobs").iterdir()) == ["0123abcd.json"]
    assert list((store.root / "tmp").iterdir()) == []


# ---------------------------------------------------------------------------------- fsck


def test_fsck_reports_corruption_and_dangling_jobs(store: LocalStore, tmp_path: Path) -> None:
    good = store.log("good", "t", make_dir(tmp_path / "g", {"f": "good"}))
    bad = store.log("bad", "t", make_dir(tmp_path / "b", {"f": "bad", "g": "gone"}))
    store.record_job("job1", {"out": good.ref})
    assert store.fsck() == FsckReport()
    assert store.fsck().ok
    (store.root / "jobs" / "job2.json").write_text(json.dumps({"outputs": {"out": "good:v9"}}))
    blob = store.root / "objects" / bad.files[0].sha256[:2] / bad.files[0].sha256[2:]
    blob.chmod(0o644)
    blob.write_text("tampered")
    report = store.fsck()
    assert report.corrupt == [f"bad:v0: blob of f is missing or corrupt ({blob})"]
    assert report.dangling_jobs == ["job2: outputs missing: good:v9"]
    assert not report.ok
    assert store.get("bad:v0") == bad  # reported, not deleted
    blob.unlink()
    assert store.fsck().corrupt == [f"bad:v0: blob of f is missing or corrupt ({blob})"]
    assert manifest_digest(bad.files) == bad.digest


def test_fsck_removes_only_abandoned_temp_entries(store: LocalStore) -> None:
    tmp = store.root / "tmp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (tmp / f"{host}-{dead.pid}-aa.version").mkdir()
    (tmp / f"{host}-{dead.pid}-aa.version" / "version.json").write_text("{}")
    (tmp / f"{host}-{os.getpid()}-bb.blob").write_text("in progress")
    old = tmp / "otherhost-1-cc.blob"
    old.write_text("old")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (tmp / "otherhost-2-dd.blob").write_text("young, other host")
    report = store.fsck()
    assert sorted(report.removed_temp) == sorted([f"{host}-{dead.pid}-aa.version", "otherhost-1-cc.blob"])
    assert sorted(p.name for p in tmp.iterdir()) == sorted([f"{host}-{os.getpid()}-bb.blob", "otherhost-2-dd.blob"])
    assert sorted(store.fsck(temp_max_age_s=0).removed_temp) == sorted(
        [f"{host}-{os.getpid()}-bb.blob", "otherhost-2-dd.blob"]
    )
    assert list(tmp.iterdir()) == []


# ------------------------------------------------------------------------------- locking

HOLD_LOCK = """
import sys, time
from pathlib import Path
from orchestrator.artifacts import file_lock
with file_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_times_out_naming_the_file_and_is_freed_by_sigkill(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = spawn(HOLD_LOCK, str(lock))
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        start = time.monotonic()
        with pytest.raises(LockTimeout, match=f"{lock}.*pid {holder.pid}"), file_lock(lock, timeout_s=0.3):
            pass
        assert 0.25 < time.monotonic() - start < 5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with file_lock(lock, timeout_s=5):
        assert f"pid {os.getpid()}" in lock.read_text()


def test_log_waits_for_the_artifact_lock(store: LocalStore, tmp_path: Path) -> None:
    lock = store.root / "artifacts" / "x" / "lock"
    holder = spawn(HOLD_LOCK, str(lock))
    impatient = LocalStore(store.root, lock_timeout_s=0.3)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(LockTimeout, match=f"{lock}"):
            impatient.log("x", "t", make_dir(tmp_path / "a", {"f": "1"}))
        assert store.versions("x") == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert impatient.log("x", "t", tmp_path / "a").ref == ArtifactRef("x", 0)


def test_lock_excludes_threads_of_one_process(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with file_lock(lock):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(5)
        with pytest.raises(LockTimeout, match="x.lock"), file_lock(lock, timeout_s=0.2):
            pass
    finally:
        release.set()
        t.join()
    with file_lock(lock, timeout_s=1):
        pass


# ------------------------------------------------------------------- atomicity and concurrency

LOG_LOOP = (
    GEN_SRC
    + """
import sys
from orchestrator.artifacts import LocalStore
root, src, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
store = LocalStore(root, lock_timeout_s=10)
print("ready", flush=True)
for seed in range(start, start + 1000):
    write_content(src, seed)
    store.log("big", "blob", src, metadata={"seed": seed}, aliases=[f"s{seed % 3}"])
"""
)


def test_sigkill_at_random_points_never_leaves_a_partial_version(tmp_path: Path) -> None:
    root = tmp_path / "store"
    LocalStore(root)
    rng = random.Random(1234)
    for kill in range(25):
        src = tmp_path / f"src{kill}"
        src.mkdir()
        # Like a rerun job, resume with the content that was being logged when killed.
        start = max((v.metadata["seed"] + 1 for v in LocalStore(root).versions("big")), default=0)
        child = spawn(LOG_LOOP, str(root), str(src), str(start))
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL

    store = LocalStore(root, lock_timeout_s=10)
    versions = store.versions("big")
    assert len(versions) >= 10  # the children made progress between kills
    assert [v.ref.version for v in versions] == list(range(len(versions)))
    seeds = [v.metadata["seed"] for v in versions]
    assert len(set(seeds)) == len(seeds)
    for v in versions:
        expected = gen_content(v.metadata["seed"])
        assert {f.path: (f.sha256, f.size) for f in v.files} == {
            rel: (sha(data), len(data)) for rel, data in expected.items()
        }
        assert manifest_digest(v.files) == v.digest
        for f in v.files:
            assert sha((store.root / "objects" / f.sha256[:2] / f.sha256[2:]).read_bytes()) == f.sha256
    # Aliases are written atomically: each names a complete version logged with that alias.
    aliases = json.loads((root / "artifacts" / "big" / "aliases.json").read_text())
    assert sorted(aliases) == ["s0", "s1", "s2"]
    for alias in aliases:
        assert store.get(f"big:{alias}").metadata["seed"] % 3 == int(alias[1])
    last = store.materialize(versions[-1].ref)
    assert (last / "a.bin").read_bytes() == gen_content(seeds[-1])["a.bin"]

    leftovers = sorted(p.name for p in (root / "tmp").iterdir())
    report = store.fsck()
    assert report.corrupt == [] and report.dangling_jobs == []
    assert sorted(report.removed_temp) == leftovers
    assert len(leftovers) > 0  # kills landed mid-log
    assert list((root / "tmp").iterdir()) == []
    assert store.fsck().removed_temp == []
    # The store still works (no stale lock): the next log gets the next number.
    nxt = store.log("big", "blob", make_dir(tmp_path / "final", {"f": "final"}))
    assert nxt.ref.version == len(versions)


CRASH_AT_STEP = """
import os, signal, sys
from pathlib import Path
from orchestrator import fsutil
from orchestrator.artifacts import LocalStore
root, src, crash_at, barrier = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
calls = 0

def crashing(real):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper

store = LocalStore(root)
if barrier == "fsync":  # as where the OS has no syncfs: each file and directory is fsynced
    fsutil.syncfs = lambda path: False
os.fsync, os.rename, os.replace = crashing(os.fsync), crashing(os.rename), crashing(os.replace)
fsutil.syncfs = crashing(fsutil.syncfs)
store.log("x", "t", src, aliases=["best"])
"""


@pytest.mark.parametrize("barrier", ["syncfs", "fsync"])
def test_sigkill_before_each_fsync_and_rename_leaves_a_consistent_store(tmp_path: Path, barrier: str) -> None:
    files = {"a.bin": b"a" * 5000, "d/b.txt": "bee", "d/c.txt": "sea"}
    src = make_dir(tmp_path / "src", files)
    expected = {rel: sha(data.encode() if isinstance(data, str) else data) for rel, data in files.items()}
    outcomes = []
    for step in range(1, 40):
        root = tmp_path / f"store{step}"
        rc = spawn(CRASH_AT_STEP, str(root), str(src), str(step), barrier).wait()
        outcomes.append(rc)
        store = LocalStore(root)
        for v in store.versions("x"):  # at most v0, and complete if visible
            assert v.ref.version == 0
            assert {f.path: f.sha256 for f in v.files} == expected
        assert store.fsck().ok
        assert list((root / "tmp").iterdir()) == []
        v = store.log("x", "t", src, aliases=["best"])  # the rerun completes the job
        assert v.ref.version == 0 and v.aliases == ("latest", "best")
        assert {f.path: f.sha256 for f in v.files} == expected
        assert store.fsck().ok
        if rc == 0:
            break
    assert outcomes[-1] == 0, "the log never completed: raise the step range"
    assert outcomes[:-1] == [-signal.SIGKILL] * (len(outcomes) - 1)
    assert len(outcomes) > 10  # both barriers, every blob, the version record and the alias file were crash points


CONCURRENT_LOG = """
import sys, time
from pathlib import Path
from orchestrator.artifacts import LocalStore
root, base, proc, go = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
store = LocalStore(root, lock_timeout_s=60)
while not go.exists():
    time.sleep(0.002)
for i in range(10):
    d = base / f"{proc}-{i}"
    d.mkdir(parents=True)
    (d / "data.txt").write_text(f"proc {proc} item {i}")
    (d / "shared.bin").write_bytes(b"same" * 50_000)
    print(store.log("shared", "data", d, metadata={"proc": proc, "i": i}).ref.version, flush=True)
"""


def test_concurrent_processes_get_distinct_gap_free_versions(tmp_path: Path) -> None:
    root = tmp_path / "store"
    go = tmp_path / "go"
    procs = [spawn(CONCURRENT_LOG, str(root), str(tmp_path / "src"), str(p), str(go)) for p in range(6)]
    time.sleep(0.3)
    go.touch()
    returned: list[int] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        returned += [int(line) for line in out.split()]
    assert sorted(returned) == list(range(60))
    store = LocalStore(root)
    versions = store.versions("shared")
    assert [v.ref.version for v in versions] == list(range(60))
    assert sorted((v.metadata["proc"], v.metadata["i"]) for v in versions) == [
        (p, i) for p in range(6) for i in range(10)
    ]
    for v in versions:
        data = {f.path: f.sha256 for f in v.files}["data.txt"]
        assert data == sha(f"proc {v.metadata['proc']} item {v.metadata['i']}".encode())
    assert count_blobs(store) == 61  # 60 distinct data.txt + one shared.bin
    assert store.fsck().ok


def test_concurrent_threads_get_distinct_gap_free_versions(store: LocalStore, tmp_path: Path) -> None:
    def log_many(t: int) -> list[int]:
        out = []
        for i in range(8):
            src = make_dir(tmp_path / f"{t}-{i}", {"f.txt": f"thread {t} item {i}"})
            out.append(store.log("th", "data", src, metadata={"t": t, "i": i}).ref.version)
        return out

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(log_many, range(5)))
    assert sorted(n for r in results for n in r) == list(range(40))
    assert all(r == sorted(r) for r in results)  # each thread's versions increase
    versions = store.versions("th")
    assert sorted((v.metadata["t"], v.metadata["i"]) for v in versions) == [(t, i) for t in range(5) for i in range(8)]


def test_concurrent_identical_logs_make_one_version(store: LocalStore, tmp_path: Path) -> None:
    srcs = [make_dir(tmp_path / f"s{t}", {"same.txt": "identical", "d/x": "y"}) for t in range(6)]
    with ThreadPoolExecutor(6) as pool:
        refs = list(pool.map(lambda src: store.log("dup", "t", src, metadata={"src": src.name}).ref, srcs))
    assert refs == [ArtifactRef("dup", 0)] * 6
    assert len(store.versions("dup")) == 1
    assert count_blobs(store) == 2
    assert list((store.root / "tmp").iterdir()) == []


# ------------------------------------------------------------- one read per file, batched durability

_opened: list[str] | None = None  # paths opened while a test listens (audit hooks cannot be removed)


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def opened_under(root: Path, fn: object) -> list[str]:
    """The files under ``root`` that ``fn()`` opened, one entry per open (builtin open and os.open)."""
    global _opened
    _opened = []
    try:
        fn()  # type: ignore[operator]
        return sorted(p for p in _opened if Path(p).is_relative_to(root))
    finally:
        _opened = None


def big_and_small(path: Path) -> dict[str, bytes]:
    rng = random.Random(7)
    files = {"big.bin": rng.randbytes(3 * (1 << 20) + 5), "empty": b""}
    files |= {f"d{i % 3}/f{i}.txt": rng.randbytes(rng.randrange(1, 5000)) for i in range(40)}
    make_dir(path, files)  # type: ignore[arg-type]
    return files


@pytest.mark.parametrize("move", [False, True])
def test_first_log_reads_each_file_once(store: LocalStore, tmp_path: Path, move: bool) -> None:
    src = tmp_path / "src"
    files = big_and_small(src)
    store._hashes.settle_s = 0.0
    opens = opened_under(src, lambda: store.log("x", "t", src, move=move))
    assert sorted(opens) == sorted(str(src / rel) for rel in files)  # each once: no manifest pass
    v = store.get("x:v0")
    assert {f.path: f.sha256 for f in v.files} == {rel: sha(data) for rel, data in files.items()}
    out = store.materialize(v.ref)
    assert all((out / rel).read_bytes() == data for rel, data in files.items())
    if not move:  # the same files, remembered: an identical re-log reads none of them
        assert opened_under(src, lambda: store.log("x", "t", src)) == []
    assert store.fsck().ok
    assert list((store.root / "tmp").iterdir()) == []


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[object]:
    calls: list[object] = []
    real = getattr(obj, name)

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counting)
    return calls


def test_durability_is_two_syncfs_not_one_fsync_per_file(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_dir(tmp_path / "src", {f"f{i}": f"content {i}" for i in range(50)})
    syncs = count_calls(monkeypatch, fsutil, "syncfs")
    fsyncs = count_calls(monkeypatch, os, "fsync")
    store.log("x", "t", src, aliases=["best"])
    assert len(syncs) == 2  # barrier 1 (blob bytes) and barrier 2 (blob names, version record)
    assert len(fsyncs) == 3  # the versions/ folder (the commit), the alias file and its folder
    syncs.clear()
    fsyncs.clear()
    assert store.log("x", "t", src).ref.version == 0  # identical content: nothing to make durable
    assert syncs == [] and fsyncs == []
    assert list((store.root / "tmp").iterdir()) == []


def test_without_syncfs_every_blob_and_folder_is_fsynced(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"d{i % 2}/f{i}": f"content {i}" for i in range(6)} | {"same1": "dup", "same2": "dup"}
    src = make_dir(tmp_path / "src", files)
    monkeypatch.setattr(fsutil, "syncfs", lambda path: False)
    synced = count_calls(monkeypatch, fsutil, "fsync_path")
    v = store.log("x", "t", src)
    names = [Path(str(p)).name for p in synced]
    assert sum(n.endswith(".blob") for n in names) == 7  # each new blob's bytes, before its rename
    blob_dirs = {str(store._blob(f.sha256).parent) for f in v.files}
    assert blob_dirs <= {str(p) for p in synced}  # each blob's name, before the commit
    assert "version.json" in names
    assert store.fsck().ok


def test_move_renames_files_into_the_store(store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "staging" / "out"
    files = big_and_small(src)
    inodes = {rel: (src / rel).stat().st_ino for rel in files}
    copied = store.log("copy", "t", make_dir(tmp_path / "copy", files))  # type: ignore[arg-type]
    moved_src = make_dir(tmp_path / "staging2", {"new.bin": b"not stored yet", "again.txt": files["d0/f0.txt"]})
    v = store.log("x", "t", src, move=True)
    assert v.digest == copied.digest  # moving or copying: the same version
    # Content already stored stays where it is; the rest was moved, not copied: same inode.
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()) == sorted(files)
    v2 = store.log("y", "t", moved_src, move=True)
    new = next(f for f in v2.files if f.path == "new.bin")
    assert not (moved_src / "new.bin").exists()
    assert (moved_src / "again.txt").exists()  # its blob existed: left in place
    blob = store._blob(new.sha256)
    assert blob.read_bytes() == b"not stored yet"
    assert blob.stat().st_mode & 0o777 == 0o444
    assert store.fsck().ok
    # A fresh tree with unseen content is moved whole.
    fresh = tmp_path / "fresh"
    make_dir(fresh, {"a/one.bin": random.Random(1).randbytes(2_000_000), "two.txt": "two, fresh"})
    ino = (fresh / "a/one.bin").stat().st_ino
    v3 = store.log("z", "t", fresh, move=True)
    assert [p for p in fresh.rglob("*") if p.is_file()] == []
    one = next(f for f in v3.files if f.path == "a/one.bin")
    assert store._blob(one.sha256).stat().st_ino == ino
    assert (store.materialize(v3.ref) / "two.txt").read_text() == "two, fresh"
    assert list((store.root / "tmp").iterdir()) == []
    assert inodes  # (the first tree's inodes were not reused by a copy: checked through v3)


def test_move_copies_what_it_may_not_take(store: LocalStore, tmp_path: Path) -> None:
    outside = make_dir(tmp_path / "outside", {"target.txt": "linked to", "hard.txt": "hard linked"})
    src = make_dir(tmp_path / "src", {"own.txt": "own"})
    (src / "link.txt").symlink_to(outside / "target.txt")
    os.link(outside / "hard.txt", src / "hard.txt")
    v = store.log("x", "t", src, move=True)
    assert {f.path: f.sha256 for f in v.files} == {
        "own.txt": sha(b"own"), "link.txt": sha(b"linked to"), "hard.txt": sha(b"hard linked"),
    }  # fmt: skip
    assert not (src / "own.txt").exists()
    assert (src / "link.txt").is_symlink() and (src / "hard.txt").exists()
    for name in ("target.txt", "hard.txt"):  # still the caller's: neither moved nor made read-only
        assert (outside / name).stat().st_mode & 0o200
    assert store._blob(sha(b"hard linked")).stat().st_ino != (outside / "hard.txt").stat().st_ino
    assert store.fsck().ok


def test_move_falls_back_to_copy_across_filesystems(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_dir(tmp_path / "src", {"a.bin": b"a" * 3000, "b.txt": "bee"})
    real = os.rename

    def cross_device(a: object, b: object) -> None:
        if Path(str(a)).is_relative_to(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", cross_device)
    v = store.log("x", "t", src, move=True)
    assert (src / "a.bin").exists() and (src / "b.txt").exists()  # copied instead
    assert (store.materialize(v.ref) / "a.bin").read_bytes() == b"a" * 3000
    assert store.fsck().ok
    assert list((store.root / "tmp").iterdir()) == []
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != store.root.stat().st_dev:
        other = make_dir(Path(tempfile.mkdtemp(dir=shm)), {"c.txt": "on tmpfs"})
        try:
            store.log("y", "t", other, move=True)
            assert (other / "c.txt").read_text() == "on tmpfs"  # another filesystem: copied
        finally:
            shutil.rmtree(other)


def test_a_file_changed_while_logged_is_refused(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_dir(tmp_path / "src", {"a.txt": "one", "b.txt": "two"})
    real_list = local.list_source

    def list_then_edit(source: Path) -> list:  # type: ignore[type-arg]
        listed = real_list(source)
        time.sleep(0.01)  # past the filesystem's timestamp granularity
        (src / "a.txt").write_text("ONE")  # same size, new content
        return listed

    monkeypatch.setattr(local, "list_source", list_then_edit)
    with pytest.raises(ArtifactError, match="a.txt changed while it was being logged"):
        store.log("x", "t", src)
    monkeypatch.setattr(local, "list_source", real_list)
    # move: edited after it was hashed, before it is renamed into the store (during barrier 1)
    real_syncfs = fsutil.syncfs

    def syncfs_then_edit(path: Path) -> bool:
        os.chmod(src / "b.txt", 0o644)
        (src / "b.txt").write_text("TWO")
        return real_syncfs(path)

    monkeypatch.setattr(fsutil, "syncfs", syncfs_then_edit)
    with pytest.raises(ArtifactError, match="b.txt changed while it was being logged"):
        store.log("x", "t", src, move=True)
    assert store.versions("x") == []
    assert list((store.root / "tmp").iterdir()) == []
    monkeypatch.setattr(fsutil, "syncfs", real_syncfs)
    assert store.fsck().ok


def test_concurrent_moves_of_identical_content_make_one_version(store: LocalStore, tmp_path: Path) -> None:
    big = random.Random(3).randbytes(2_500_000)
    srcs = [make_dir(tmp_path / f"s{t}", {"same.bin": big, "d/x": "y"}) for t in range(6)]
    with ThreadPoolExecutor(6) as pool:
        refs = list(pool.map(lambda src: store.log("dup", "t", src, move=True).ref, srcs))
    assert refs == [ArtifactRef("dup", 0)] * 6
    assert count_blobs(store) == 2
    left = sum(1 for src in srcs for p in src.rglob("*") if p.is_file())
    assert left <= 2 * 6 - 2  # each blob was taken from some source; the others kept theirs
    out = store.materialize(refs[0])
    assert (out / "same.bin").read_bytes() == big and (out / "d/x").read_text() == "y"
    assert store.fsck().ok
    assert list((store.root / "tmp").iterdir()) == []
