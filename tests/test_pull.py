"""``python -m orchestrator pull ENTITY/PROJECT STUDY``: rebuilding a study's store from W&B.

The REAL wandb 0.31 client (``wandb.Api``, ``Artifact.download``, its wandb-core sidecar) talks to
a FAKE W&B server (tests/wandbfake.py: a local HTTP server answering exactly the GraphQL queries
and file downloads the client makes for these calls). The fake is seeded from a real store: the
toy study run through the real CLI with local tracking, its index built by ``build_index`` (what
``track`` publishes), each version's files, manifest and metadata stored as a live
``log_artifact`` would have left them. Pulls run through the real CLI into other folders. Not
tested here: a live W&B server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import ROOT, TESTS, TOY_SPEC, ended_within, kill_all
from wandbfake import FakeWandb, serving

from orchestrator.artifacts import LocalStore, ReadOnlyStore
from orchestrator.artifacts.adopt import adopt
from orchestrator.executors.base import run_reasons
from orchestrator.export import export_type
from orchestrator.paths import StudyPaths
from orchestrator.plan import build_plan
from orchestrator.procutil import children
from orchestrator.spec import load_study
from orchestrator.tracking.index import INDEX_FILE, INDEX_TYPE, build_index, index_aliases, index_artifact_name, parse_index
from orchestrator.tracking.pull_source import WandbProject

pytest.importorskip("wandb")

ENTITY, PROJECT, KEY = "fake-team", "subnets", "f" * 40


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def env_for(tmp: Path, fake: FakeWandb | None = None, **extra: str) -> dict[str, str]:
    """A process environment whose W&B files stay under ``tmp``, pointed at the fake server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
               WANDB_CONFIG_DIR=str(tmp / "wandb-config"), WANDB_DATA_DIR=str(tmp / "wandb-data"),
               WANDB_DIR=str(tmp / "wandb-dir"), NETRC=str(tmp / "netrc"), ORCHESTRATOR_WANDB_API_TIMEOUT="5")
    if fake is not None:
        env.update(WANDB_BASE_URL=fake.url, WANDB_API_KEY=KEY)
    env.update(extra)
    return env


def records(root: Path) -> dict[str, Any]:
    """Every version record, job record and the toy plan under a storage root, parsed."""
    store = root / "artifacts"
    out = {str(p.relative_to(store)): json.loads(p.read_text()) for p in sorted((store / "artifacts").rglob("version.json"))}
    out |= {str(p.relative_to(store)): json.loads(p.read_text()) for p in sorted((store / "jobs").glob("*.json"))}
    out["plan"] = json.loads((root / "studies" / "toy" / "plan.json").read_text())
    return out


def seed(fake: FakeWandb, root: Path) -> dict[str, Any]:
    """Put the toy study of the store under ``root`` on the fake server as ``track`` would: each
    indexed version under its W&B name with aliases ``job-<key16>`` and ``study-toy`` and the
    lineage metadata, then the index. Returns the index data."""
    store = LocalStore(root / "artifacts")
    data = build_index(StudyPaths(root, "toy"), store)
    for entry in parse_index(data).versions:
        record = entry.record
        lineage = {"ref": str(entry.ref), "digest": entry.digest, "created_at": record["created_at"], "study": "toy",
                   "job_key": (record.get("producer") or {}).get("job_key")}
        fake.log_artifact(entry.wandb_name, entry.type, store.materialize(entry.ref),
                          {**record["metadata"], "orchestrator": lineage}, [entry.wandb_alias, "study-toy"])
    folder = root.parent / "index-upload"
    folder.mkdir()
    (folder / INDEX_FILE).write_text(json.dumps(data))
    fake.log_artifact(index_artifact_name("toy"), INDEX_TYPE, folder, {"orchestrator": {"study": "toy"}}, index_aliases("toy"))
    return data


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The toy study run with local tracking into ``source/``, published on a fake W&B server, and
    pulled once through the CLI into the empty storage root ``pulled/``."""
    tmp = tmp_path_factory.mktemp("pull")
    work, source = tmp / "work", tmp / "source"
    work.mkdir()
    spec = work / "toy.yaml"
    spec.write_text(TOY_SPEC)
    sub = cli("submit", str(spec), "--store", str(source), cwd=work, env=env_for(tmp))
    assert sub.returncode == 0, sub.stdout + sub.stderr
    with serving(ENTITY, PROJECT, KEY) as fake:
        index = seed(fake, source)
        fake.requests.clear()
        pulled = tmp / "pulled"
        out = cli("pull", f"{ENTITY}/{PROJECT}", "toy", "--store", str(pulled), cwd=work,
                  env=env_for(tmp, fake, WANDB_MODE="offline"))  # as on a cluster: pull reads W&B all the same
        yield {"tmp": tmp, "work": work, "spec": spec, "source": source, "pulled": pulled, "fake": fake, "index": index,
               "out": out, "requests": list(fake.requests)}


def pull(study: dict[str, Any], store: Path, *extra: str, project: str = f"{ENTITY}/{PROJECT}", name: str = "toy",
         **env: str) -> subprocess.CompletedProcess[str]:
    return cli("pull", project, name, "--store", str(store), *extra, cwd=study["work"],
               env=env_for(study["tmp"], study["fake"], **env))


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "cache" not in p.parts and "materialized" not in p.parts}


def test_pull_rebuilds_the_store(study: dict[str, Any]) -> None:
    out, pulled, source = study["out"], study["pulled"], study["source"]
    assert out.returncode == 0, out.stdout + out.stderr
    assert records(pulled) == records(source)  # same numbers, same version records, job records, plan
    versions = study["index"]["versions"]
    assert len(versions) == 7 and len(study["index"]["jobs"]) == 7
    lines = out.stdout.splitlines()
    assert len([line for line in lines if line.startswith("  toy.")]) == len(versions)  # one line per artifact
    assert "pulled 7 versions (0 were present), 7 job records" in lines[-1], out.stdout
    assert out.stderr == ""
    assert not study["fake"].unknown  # the client asked only what the fake answers
    assert {r.split(" ")[0] + " " + r.split(" ")[1].split("/")[1] if r.startswith("GET") else r for r in study["requests"]} == {
        "graphql Viewer", "graphql ServerFeaturesQuery", "graphql ArtifactMembershipByName", "graphql FetchArtifactManifest",
        "graphql GetArtifactMembershipFileUrls", "GET manifests", "GET files"}
    store = LocalStore(pulled / "artifacts")
    assert store.fsck().ok and not os.listdir(pulled / "artifacts" / "tmp")
    source_store = LocalStore(source / "artifacts")
    for entry in versions:
        assert tree(store.materialize(entry["ref"])) == tree(source_store.materialize(entry["ref"]))


def test_pulled_store_has_everything_cached(study: dict[str, Any], tmp_path: Path) -> None:
    pulled = study["pulled"]
    s, registry = load_study(study["spec"], [f"storage.root={pulled}"])
    plan = build_plan(s, registry)
    assert run_reasons(plan, LocalStore(pulled / "artifacts"), force=False) == {}
    # no job ran here, but every one has its outputs in the store: status says they are cached
    shown = cli("status", "toy", "--store", str(pulled), cwd=study["work"], env=env_for(study["tmp"]))
    assert shown.returncode == 0 and "7 cached" in shown.stdout, shown.stdout + shown.stderr
    shown = cli("status", "toy", "--store", str(pulled), "--json", cwd=study["work"], env=env_for(study["tmp"]))
    assert shown.returncode == 0 and json.loads(shown.stdout)["counts"] == {"cached": 7}, shown.stdout + shown.stderr
    before = tree(pulled / "artifacts")
    sub = cli("submit", str(study["spec"]), "--store", str(pulled), cwd=study["work"], env=env_for(study["tmp"]))
    assert sub.returncode == 0 and "study toy: 7 cached, 0 succeeded" in sub.stdout, sub.stdout + sub.stderr
    assert tree(pulled / "artifacts") == before  # nothing ran, nothing was committed
    # what `plots` does (copy every output of one type out of the store), for the toy study's type
    written = export_type(StudyPaths(pulled, "toy"), ReadOnlyStore(pulled / "artifacts"), "number", tmp_path / "out")
    assert len(written) == 7 and all((folder / "value.json").exists() for folder in written)
    shown = cli("artifacts", "toy", "--store", str(pulled), cwd=study["work"], env=env_for(study["tmp"]))
    assert shown.returncode == 0 and "toy.total" in shown.stdout, shown.stderr


def test_second_pull_is_a_no_op(study: dict[str, Any]) -> None:
    pulled = study["pulled"]
    before = tree(pulled)
    study["fake"].requests.clear()
    again = pull(study, pulled)
    assert again.returncode == 0, again.stderr
    assert "pulled 0 versions (7 were present), 0 job records (7 present), plan.json" in again.stdout, again.stdout
    index = study["fake"].find(index_artifact_name("toy"), "latest")
    downloads = [r for r in study["fake"].requests if r.startswith("GET /files/")]
    assert downloads == [f"GET /files/{quote(index.id, safe='')}/{INDEX_FILE}"]  # the index only
    assert tree(pulled) == before


def test_pull_resumes(study: dict[str, Any], tmp_path: Path) -> None:
    """A store that has some versions already (a pull that stopped half-way) gets only the rest."""
    root = tmp_path / "half"
    store, source = LocalStore(root / "artifacts"), LocalStore(study["source"] / "artifacts")
    have = [v for v in parse_index(study["index"]).versions][:3]
    for v in have:
        adopt(store, v.ref, v.record, source.materialize(v.ref))
    out = pull(study, root)
    assert out.returncode == 0, out.stderr
    assert "pulled 4 versions (3 were present)" in out.stdout
    assert records(root) == records(study["source"])


def test_tampered_file_is_refused(study: dict[str, Any], tmp_path: Path) -> None:
    """W&B serves other bytes for one file of the last version (its own manifest agreeing, or not):
    one line, and nothing of the pull enters the store, not even the versions verified before."""
    fake: FakeWandb = study["fake"]
    last = parse_index(study["index"]).versions[-1]
    path = last.files[0].path
    original = fake.find(last.wandb_name, last.wandb_alias)
    assert original is not None
    saved = (original.files[path], json.loads(json.dumps(original.manifest)))
    for manifest_too in (True, False):
        root = tmp_path / f"tampered-{manifest_too}"
        fake.tamper(last.wandb_name, last.wandb_alias, path, b'{"value": 666}', manifest_too=manifest_too)
        try:
            out = pull(study, root)
        finally:
            original.files[path], original.manifest = saved
        assert out.returncode == 1
        assert out.stderr.count("\n") == 1 and "does not match" in out.stderr and str(last.ref) in out.stderr, out.stderr
        assert "nothing was written to the store" in out.stderr
        assert not (root / "studies").exists() and not os.listdir(root / "artifacts" / "jobs")
        assert not os.listdir(root / "artifacts" / "artifacts") and not os.listdir(root / "artifacts" / "tmp")
        assert not list((root / "artifacts" / "objects").rglob("*/*"))


def test_conflicting_local_version_is_refused(study: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "other"
    store = LocalStore(root / "artifacts")
    first = parse_index(study["index"]).versions[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "value.json").write_text("other content")
    store.log(first.ref.name, first.type, mine)  # v0 of the same name, other content
    before = tree(root)
    out = pull(study, root)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"already has {first.ref} with digest" in out.stderr and "nothing was overwritten" in out.stderr
    assert tree(root) == before


def test_dry_run_writes_nothing(study: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "dry"
    out = pull(study, root, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert len([line for line in out.stdout.splitlines() if line.startswith("  would pull toy.")]) == 7
    assert not root.exists()


@pytest.mark.parametrize(
    ("case", "advice"),
    [
        ("no index", "run `orchestrator track nosuch` where the study's store is"),
        ("wrong project", "check the entity/project spelling"),
        ("wrong key", "refused the login"),
        ("no key", "no W&B credentials"),
        ("server down", "did not answer"),
    ],
)
def test_failures_are_one_line_with_advice(study: dict[str, Any], tmp_path: Path, case: str, advice: str) -> None:
    root = tmp_path / "store"
    env: dict[str, str] = {}
    name, project = "toy", f"{ENTITY}/{PROJECT}"
    if case == "no index":
        name = "nosuch"
    elif case == "wrong project":
        project = f"{ENTITY}/subnetz"
    elif case == "wrong key":
        env["WANDB_API_KEY"] = "0" * 40
    elif case == "no key":
        env["WANDB_API_KEY"] = ""
    elif case == "server down":
        env.update(WANDB_BASE_URL="http://127.0.0.1:9", ORCHESTRATOR_WANDB_API_TIMEOUT="2")  # nothing listens there
    out = pull(study, root, project=project, name=name, **env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and advice in out.stderr, out.stderr
    assert not (root / "studies").exists()


@pytest.mark.slow  # the bounded 10 s wait: about 15 s here
def test_a_wandb_service_that_stops_answering_does_not_hold_pull(study: dict[str, Any], tmp_path: Path) -> None:
    """wandb's exit hook waits for its service process without a limit. Here the service stops
    answering altogether (SIGSTOP, as a service stuck retrying a dead server): pull must still
    print its one line and exit, and leave no service behind."""
    env = env_for(study["tmp"], study["fake"], WANDB_BASE_URL="http://127.0.0.1:9", ORCHESTRATOR_WANDB_API_TIMEOUT="2")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "pull", f"{ENTITY}/{PROJECT}", "toy", "--store",
                             str(tmp_path / "store")], cwd=study["work"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    frozen: list[int] = []
    try:
        while not frozen and proc.poll() is None:
            frozen = children(proc.pid, "wandb-core")
            time.sleep(0.01)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        _, err = proc.communicate(timeout=120)
        assert frozen, "pull started no wandb service"
        assert proc.returncode == 1 and err.startswith("error: ") and "did not answer" in err, err
        assert ended_within(frozen, 10), "pull left its wandb service running"  # killed by the command, gone soon after
    finally:
        proc.kill()
        kill_all(frozen)


def test_bad_target_is_a_usage_error(study: dict[str, Any], tmp_path: Path) -> None:
    out = pull(study, tmp_path / "s", project="just-a-project")
    assert out.returncode == 2 and "is not ENTITY/PROJECT" in out.stderr
    shutil.rmtree(tmp_path / "s", ignore_errors=True)


def test_a_wandb_service_that_does_not_start_is_not_called_a_refused_login(tmp_path: Path) -> None:
    """wandb's own process failing to start (it gives up waiting for its port file) is not the
    server refusing the key: the line says which process did not answer."""
    source = WandbProject(ENTITY, PROJECT, tmp_path)
    error = source._login_error(RuntimeError("Failed to read port info after 30.0 seconds (wandb-core PID=1): /tmp/port-1.txt"))
    assert "wandb's service process did not answer" in str(error) and "refused" not in str(error), error
