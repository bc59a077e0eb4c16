"""Tests of the local directory artifact store and its file lock."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.artifacts import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    FsckReport,
    LocalStore,
    LockTimeout,
    Producer,
    file_lock,
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


def test_materialize_losing_the_race_uses_the_winner(store: LocalStore, tmp_path: Path) -> None:
    v = store.log("x", "t", make_dir(tmp_path / "src", {"a": "1", "b": "2"}))

    class Racing(LocalStore):
        raced = False

        def _link_or_copy(self, blob: Path, target: Path) -> None:
            if not self.raced:  # another process finishes first, mid-way through our build
                self.raced = True
                LocalStore(self.root).materialize(v.ref)
            super()._link_or_copy(blob, target)

    racer = Racing(store.root)
    path = racer.materialize(v.ref)
    assert racer.raced
    assert path == store.root / "materialized" / "x" / "v0"
    assert (path / "a").read_text() == "1"
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
from orchestrator.artifacts import LocalStore
root, src, crash_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
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
os.fsync, os.rename, os.replace = crashing(os.fsync), crashing(os.rename), crashing(os.replace)
store.log("x", "t", src, aliases=["best"])
"""


def test_sigkill_before_each_fsync_and_rename_leaves_a_consistent_store(tmp_path: Path) -> None:
    files = {"a.bin": b"a" * 5000, "d/b.txt": "bee", "d/c.txt": "sea"}
    src = make_dir(tmp_path / "src", files)
    expected = {rel: sha(data.encode() if isinstance(data, str) else data) for rel, data in files.items()}
    outcomes = []
    for step in range(1, 40):
        root = tmp_path / f"store{step}"
        rc = spawn(CRASH_AT_STEP, str(root), str(src), str(step)).wait()
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
    assert len(outcomes) > 10  # every blob, the version record and the alias file were crash points


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
