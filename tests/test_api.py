"""orchestrator.api on a real store: the toy study run through the real CLI, read back through the
public API (references, files, lineage, verified downloads), also by another user on a read-only
copy of the store, which must come out byte for byte unchanged."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, TESTS, TOY_SPEC

from orchestrator import api
from orchestrator.artifacts import LocalStore

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
TOTAL = "toy.total.total"


def build_toy_store(where: Path) -> Path:
    """Submit the toy study (7 jobs) through the CLI; returns its storage root."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "toy.yaml").write_text(TOY_SPEC)
    root = where / "store"
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "toy.yaml", "--store", str(root)],
        cwd=where, capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_store(tmp_path_factory.mktemp("api"))


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    """A copy of the built store that a test may damage."""
    return Path(shutil.copytree(built, tmp_path / "store", symlinks=True))


def test_artifact_by_latest_version_alias_and_bare_name(built: Path) -> None:
    a = api.artifact(f"{TOTAL}:latest", store=built)
    assert a == api.artifact(f"{TOTAL}:v0", store=built) == api.artifact(f"{TOTAL}:study-toy", store=built)
    assert a == api.artifact(TOTAL, store=built / "artifacts")  # the artifact store itself is accepted too
    assert (a.name, a.version, a.ref, a.type) == (TOTAL, 0, f"{TOTAL}:v0", "number")
    assert a.metadata["value"] == 18.0 and "latest" in a.aliases and "study-toy" in a.aliases
    [f] = a.files
    assert f.path == "value.json" and f.size == a.size
    assert json.loads(a.read_text("value.json"))["value"] == 18.0
    assert hashlib.sha256(a.read_bytes("value.json")).hexdigest() == f.sha256
    p = a.producer
    assert p is not None and (p.job_label, p.stage, p.study) == ("total", "total", "toy") and len(p.job_key) == 64
    assert sorted(p.inputs) == [f"toy.scale.number.language-{lang}:v0" for lang in ("de", "en", "fr")]
    assert p.provenance["params"] == {"label": "sum"} and "spec_hash" in p.provenance
    assert [i.ref for i in a.inputs()] == list(p.inputs)
    assert a.to_dict()["files"] == [{"path": "value.json", "size": f.size, "sha256": f.sha256}]


def test_store_defaults_to_the_environment_then_dot_orchestrator(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(api.STORE_ENV, str(built))
    assert api.artifact(TOTAL).ref == f"{TOTAL}:v0"
    monkeypatch.delenv(api.STORE_ENV)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(api.BadArgument, match=r"no artifact store under .*\.orchestrator"):
        api.artifact(TOTAL)
    (tmp_path / ".orchestrator").symlink_to(built)
    assert api.artifact(TOTAL).digest == api.artifact(TOTAL, store=built).digest


def test_bad_references_are_one_line_errors_naming_what_exists(built: Path) -> None:
    with pytest.raises(api.BadArgument) as e:
        api.artifact("nope:latest", store=built)
    assert "no artifact named 'nope'" in str(e.value) and TOTAL in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(api.BadArgument) as e:
        api.artifact(f"{TOTAL}:v9", store=built)
    assert "no version or alias 'v9'" in str(e.value) and "versions: v0" in str(e.value) and "study-toy" in str(e.value)
    with pytest.raises(api.BadArgument, match="not an artifact reference"):
        api.artifact("a:b:c", store=built)
    with pytest.raises(api.BadArgument, match="no artifact named 'nope'"):
        api.versions("nope", store=built)
    with pytest.raises(api.BadArgument, match=r"no study 'nope'"):
        api.study("nope", store=built)


def test_download_copies_the_files_verified_and_is_repeatable(built: Path, tmp_path: Path) -> None:
    a = api.artifact(TOTAL, store=built)
    out = a.download(tmp_path / "new" / "total")
    assert out == tmp_path / "new" / "total" and out.is_absolute()
    assert json.loads((out / "value.json").read_text())["value"] == 18.0
    assert os.access(out / "value.json", os.W_OK)  # the user's own copy (the store's blobs are read-only)
    assert a.download(out) == out  # holds exactly these files: verified and kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["total"]  # no temporary folder left
    other = api.artifact("toy.emit.number.language-en", store=built)
    with pytest.raises(api.BadArgument, match="exists and holds other files"):
        other.download(out)
    assert json.loads((out / "value.json").read_text())["value"] == 18.0  # untouched
    assert json.loads((other.download(out, overwrite=True) / "value.json").read_text())["language"] == "en"
    assert sorted(p.name for p in out.parent.iterdir()) == ["total"]
    (tmp_path / "empty").mkdir()
    assert (a.download(tmp_path / "empty") / "value.json").exists()  # an empty folder is filled
    with pytest.raises(api.BadArgument, match="in the artifact store"):
        a.download(built / "artifacts" / "mine")


def log_three_files(root: Path) -> str:
    """A version of three files, logged through the store's own writer; returns its reference."""
    src = root.parent / "src"
    (src / "sub").mkdir(parents=True)
    for name, text in (("a.txt", "alpha"), ("b.txt", "bravo"), ("sub/c.txt", "charlie")):
        (src / name).write_text(text)
    return str(LocalStore(root / "artifacts").log("three", "text", src).ref)


def blob(root: Path, sha: str) -> Path:
    return root / "artifacts" / "objects" / sha[:2] / sha[2:]


def test_a_corrupt_or_missing_blob_fails_the_download_and_leaves_nothing(root: Path, tmp_path: Path) -> None:
    a = api.artifact(log_three_files(root), store=root)
    b = next(f for f in a.files if f.path == "b.txt")
    damaged = blob(root, b.sha256)
    damaged.chmod(0o644)
    damaged.write_text("brav0")  # same size, other bytes
    target = tmp_path / "out" / "deep" / "three"
    with pytest.raises(api.CorruptArtifact) as e:
        a.download(target)
    assert "'b.txt'" in str(e.value) and "three:v0" in str(e.value) and "do not match" in str(e.value)
    assert not (tmp_path / "out").exists()  # no partial target, temporary folder or created parents
    assert damaged.read_text() == "brav0"  # reading never quarantines or repairs: the store stays as it was
    with pytest.raises(api.CorruptArtifact, match="'b.txt'"):
        a.read_bytes("b.txt")
    assert a.read_text("sub/c.txt") == "charlie"
    damaged.unlink()
    with pytest.raises(api.CorruptArtifact, match=r"'b.txt'.*missing"):
        a.download(target)
    assert not (tmp_path / "out").exists()


def test_lineage_walks_the_inputs_depth_first(built: Path) -> None:
    lineage = api.artifact(TOTAL, store=built).lineage()
    assert [(d, a.ref) for d, a in lineage][:3] == [
        (0, f"{TOTAL}:v0"),
        (1, "toy.scale.number.language-en:v0"),
        (2, "toy.emit.number.language-en:v0"),
    ]
    assert len(lineage) == 7 and lineage.root.ref == f"{TOTAL}:v0" and lineage.missing == {}
    assert sorted(a.ref for a in lineage.find(stage="emit")) == [f"toy.emit.number.language-{x}:v0" for x in ("de", "en", "fr")]
    assert [a.ref for a in lineage.find(name="toy.scale.number.language-fr")] == ["toy.scale.number.language-fr:v0"]
    assert str(lineage).splitlines()[1].startswith("  toy.scale.number.language-en:v0 [number] <- scale[language=en] (job ")
    tree = lineage.to_dict()
    assert tree["ref"] == f"{TOTAL}:v0" and len(tree["inputs"]) == 3 and tree["inputs"][0]["inputs"][0]["inputs"] == []


def test_lineage_shows_an_input_that_is_no_longer_stored(root: Path) -> None:
    shutil.rmtree(root / "artifacts" / "artifacts" / "toy.emit.number.language-de" / "versions" / "v0")
    lineage = api.artifact(TOTAL, store=root).lineage()
    assert lineage.missing == {"toy.emit.number.language-de:v0": "no longer in the store"}
    assert len(lineage) == 6 and "    toy.emit.number.language-de:v0 (no longer in the store)" in str(lineage).splitlines()


def test_a_studys_artifacts_and_jobs(built: Path) -> None:
    outputs = api.artifacts("toy", store=built)
    assert [a.ref for a in outputs][-1] == f"{TOTAL}:v0" and len(outputs) == 7
    assert [a.ref for a in api.artifacts("toy", type="nothing", store=built)] == []
    assert sorted(a.ref for a in api.artifacts(store=built)) == sorted(a.ref for a in outputs)
    assert [a.ref for a in api.versions(TOTAL, store=built)] == [f"{TOTAL}:v0"]
    study = api.study("toy", store=built)
    assert study.counts == {"succeeded": 7} and study.submitted_at and study.root == built
    total = study.job("total")
    assert total.state == "succeeded" and total.log is not None and total.log.exists()
    assert total.outputs["total"].ref == f"{TOTAL}:v0" and study.artifacts(type="number") == outputs
    with pytest.raises(api.BadArgument, match="has no job 'nope'"):
        study.job("nope")


# ------------------------------------------------------------------------- a read-only store
def snapshot(root: Path) -> dict[str, tuple[int, ...] | str]:
    """Every entry under ``root``: mode, size, inode, mtime and ctime, and each file's sha256."""
    out: dict[str, tuple[int, ...] | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            out[rel] = (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            if stat.S_ISREG(st.st_mode):
                out[rel + "#sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


NOBODY = 65534
_PR_CAPBSET_DROP = 24
_DAC_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


def _drop_dac_capabilities() -> None:
    """In the child before exec: root without the capabilities that let it ignore file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _DAC_CAPS:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unprivileged() -> dict[str, object]:
    """subprocess.run arguments that keep the child from writing to read-only files even when the
    tests run as root: run it as 'nobody' where that user may run this interpreter, else as root
    without CAP_DAC_OVERRIDE (the interpreter may live under /root). The child checks itself."""
    if os.geteuid() != 0:
        return {}
    nobody: dict[str, object] = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    try:
        if subprocess.run([sys.executable, "-c", "import orchestrator"], env=ENV, capture_output=True, **nobody).returncode == 0:  # type: ignore[call-overload]
            return nobody
    except PermissionError:  # cannot even execute the interpreter
        pass
    return {"preexec_fn": _drop_dac_capabilities}


@pytest.fixture
def shared(built: Path) -> Iterator[Path]:
    """A read-only copy of the built store where any user can read it (not under pytest's 0700 tmp)."""
    base = Path(tempfile.mkdtemp(prefix="ro-store-", dir="/tmp"))
    try:
        base.chmod(0o755)
        root = Path(shutil.copytree(built, base / "store", symlinks=True))
        (base / "out").mkdir(mode=0o777)
        (base / "out").chmod(0o777)
        subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
        yield root
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


READER = """
import json, os, sys
from pathlib import Path
from orchestrator import api
from orchestrator.artifacts import LocalStore
root, out = Path(sys.argv[1]), Path(sys.argv[2])
probe = root / "artifacts" / "tmp" / "probe"
try:
    probe.write_text("x")
    sys.exit("the store is writable for this process: the test proves nothing")
except PermissionError:
    pass
a = api.artifact("toy.total.total:latest", store=root)
lineage = a.lineage()
study = api.study("toy", store=root)
folder = a.download(out / "total")
try:
    LocalStore(root / "artifacts").materialize(a.ref)
    materialize = "worked"
except PermissionError:
    materialize = "refused"
print(json.dumps({"ref": a.ref, "lineage": len(lineage), "counts": study.counts, "artifacts": len(api.artifacts("toy", store=root)),
                  "value": json.loads((folder / "value.json").read_text())["value"], "materialize": materialize}))
"""


def test_the_api_and_cli_read_a_read_only_store_as_another_user_and_change_nothing(shared: Path) -> None:
    before = snapshot(shared)
    out = shared.parent / "out"
    run = unprivileged()
    child = subprocess.run(
        [sys.executable, "-c", READER, str(shared), str(out)], capture_output=True, text=True, env=ENV, timeout=120, **run
    )  # type: ignore[call-overload]
    assert child.returncode == 0, child.stdout + child.stderr
    assert json.loads(child.stdout) == {
        "ref": f"{TOTAL}:v0", "lineage": 7, "counts": {"succeeded": 7}, "artifacts": 7, "value": 18.0,
        "materialize": "refused",  # the store's own writer cannot write here: the API never needed to
    }  # fmt: skip
    for args in (
        ["status", "toy", "--json"],
        ["artifacts", "toy", "--json"],
        ["artifacts", "toy", "--lineage", TOTAL],
        ["artifacts", "get", TOTAL, "--out", str(out / "cli")],
    ):
        cli = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args, "--store", str(shared)],
            capture_output=True, text=True, env=ENV, timeout=120, cwd=out, **run,
        )  # type: ignore[call-overload]  # fmt: skip
        assert cli.returncode == 0, (args, cli.stdout + cli.stderr)
    assert json.loads((out / "cli" / "value.json").read_text())["value"] == 18.0
    assert snapshot(shared) == before


def test_status_reads_a_read_only_store_whose_local_submit_died(shared: Path) -> None:
    """A job a local submit left pending (the submit died) in a store this user may only read:
    ``status`` still answers (its check for a live submit opens the lock file read-only) and shows
    the job cancelled."""
    subprocess.run(["chmod", "-R", "u+w", str(shared)], check=True)
    state = next((shared / "studies" / "toy" / "jobs").glob("*/state.json"))
    state.write_text(json.dumps({"state": "pending", "updated_at": "2026-01-01T00:00:00+00:00", "executor": "local"}))
    assert (shared / "studies" / "toy" / "local-submit.lock").exists()  # (the submit that built it)
    subprocess.run(["chmod", "-R", "a-w", str(shared)], check=True)
    shown = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", "toy", "--json", "--store", str(shared)],
        capture_output=True, text=True, env=ENV, timeout=120, cwd=shared.parent / "out", **unprivileged(),
    )  # type: ignore[call-overload]  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert json.loads(shown.stdout)["counts"] == {"cancelled": 1, "succeeded": 6}
