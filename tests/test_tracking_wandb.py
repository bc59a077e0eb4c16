"""The W&B tracking backend.

Most tests use wandb 0.31's REAL offline mode: the toy study runs through the real CLI with
``tracking: {backend: wandb, mode: offline}`` and the tests read what wandb wrote (the offline
run's ``.wandb`` transaction log, decoded with wandb's own protobuf ``Record``). The online path
cannot reach a W&B server here: those tests use ``FakeWandb``, a FAKE client (real ``wandb.Settings``
and ``wandb.Artifact``, a fake ``init`` whose runs record calls), and check every recorded call
against the real wandb API signatures.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import inspect
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import ROOT, TESTS, TOY_SPEC, ended_within, kill_all

from orchestrator.artifacts import LocalStore, Producer
from orchestrator.errors import OrchestratorError
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan, build_plan
from orchestrator.records import JobRecord, read_plan
from orchestrator.spec import load_study
from orchestrator.sync import sync_study
from orchestrator.tracking import open_run, wandb_files
from orchestrator.tracking import wandb as wb

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

CANARY = "canary-" + "c0ffee42" * 5  # 47 characters: wandb wants 40+ after the "xxx-" prefix
WANDB_SPEC = TOY_SPEC.replace("stage_package:", "tracking: {backend: wandb, project: test, mode: offline}\nstage_package:")


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def wandb_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A job environment whose W&B files all stay under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
               WANDB_CONFIG_DIR=str(tmp / "wandb-config"), WANDB_DATA_DIR=str(tmp / "wandb-data"),
               NETRC=str(tmp / "netrc"), **extra)
    return env


# ------------------------------------------------------------------ the .wandb transaction log
def wandb_records(path: Path) -> Iterator[Any]:
    """Every record of a ``.wandb`` file: a leveldb-style log (7-byte header ``:W&B``, 32 KiB blocks,
    chunks of crc32 + length + type), each record a ``wandb_internal_pb2.Record``."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"bad checksum in {path}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def records_of(path: Path, kind: str) -> list[Any]:
    return [getattr(r, kind) for r in wandb_records(path) if r.WhichOneof("record_type") == kind]


def offline_runs(paths: StudyPaths, key: str) -> list[Path]:
    return sorted(paths.job(key).dir.glob("wandb/offline-run-*/run-*.wandb"))


def config_of(record: Any) -> dict[str, Any]:
    """The config items of a ``run`` record (its initial config) or of a ``config`` record (an update)."""
    updates = record.config.update if hasattr(record, "run_id") else record.update
    return {u.key: json.loads(u.value_json) for u in updates}


# ----------------------------------------------------------------- one real offline study
@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The toy study, run once through the real CLI with W&B offline and a canary API key in the
    environment (SLURM scripts rendered too, with --dry-run)."""
    tmp = tmp_path_factory.mktemp("wandb-study")
    work, store = tmp / "work", tmp / "store"
    work.mkdir()
    spec = work / "toy.yaml"
    spec.write_text(WANDB_SPEC)
    env = wandb_env(tmp, WANDB_API_KEY=CANARY)
    slurm = cli("submit", str(spec), "--store", str(store), "--executor", "slurm", "--dry-run", cwd=work, env=env)
    assert slurm.returncode == 0, slurm.stderr
    sub = cli("submit", str(spec), "--store", str(store), cwd=work, env=env)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    s, registry = load_study(spec, [f"storage.root={store}"])
    return {"tmp": tmp, "work": work, "store": store, "env": env, "outputs": [slurm, sub],
            "plan": build_plan(s, registry), "paths": StudyPaths(store, "toy"), "lstore": LocalStore(store / "artifacts")}


def test_the_canary_api_key_is_written_nowhere(study: dict[str, Any]) -> None:
    tmp: Path = study["tmp"]
    files = [p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len([p for p in files if p.is_relative_to(study["store"])]) > 50  # job records, runs, blobs, scripts
    assert list(study["store"].rglob("*.sbatch")), "the rendered SLURM scripts are checked too"
    leaked = [p for p in files if CANARY.encode() in p.read_bytes()]
    assert leaked == []
    for out in study["outputs"]:
        assert CANARY not in out.stdout + out.stderr


def test_one_offline_run_per_job_with_group_job_type_name_and_config(study: dict[str, Any]) -> None:
    plan: Plan = study["plan"]
    paths: StudyPaths = study["paths"]
    for job in plan.jobs:
        [log] = offline_runs(paths, job.key)
        [run] = records_of(log, "run")
        assert run.run_id == wb.run_id("toy", job.key) and log.parent.name.endswith(run.run_id)
        assert (run.project, run.run_group, run.job_type, run.display_name) == ("test", "toy", job.stage_id, job.label)
        config = config_of(run)
        assert config["job_key"] == job.key and config["seed"] == job.seed == 1234
        assert config["params"] == json.loads(json.dumps(dict(job.params))) and config["point"] == dict(job.point)
        assert config["spec_hash"] == plan.study.spec_hash() and config["stage"] == job.stage
        [row] = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item}
                 for h in records_of(log, "history")]
        store: LocalStore = study["lstore"]
        assert row["value"] == store.get(store.job_outputs(job.key)[job.outputs[0].name]).metadata["value"]


def test_artifacts_in_the_offline_run_data_have_names_types_aliases_and_digests(study: dict[str, Any]) -> None:
    plan: Plan = study["plan"]
    paths: StudyPaths = study["paths"]
    store: LocalStore = study["lstore"]
    for job in plan.jobs:
        [log] = offline_runs(paths, job.key)
        [art] = records_of(log, "artifact")
        [out] = job.outputs
        version = store.get(store.job_outputs(job.key)[out.name])
        assert (art.name, art.type) == (out.artifact, out.type) == (version.ref.name, "number")
        assert {"study-toy", f"job-{job.key[:16]}", "latest"} <= set(art.aliases)
        meta = json.loads(art.metadata)
        assert meta["orchestrator"]["digest"] == version.digest and meta["orchestrator"]["job_key"] == job.key
        assert meta["value"] == version.metadata["value"]
        mirror = store.materialize(version.ref)
        entries = {e.path: e for e in art.manifest.contents}
        assert sorted(entries) == sorted(f.path for f in version.files)
        for f in version.files:  # W&B's per-file MD5 of exactly the committed bytes, read in place
            assert entries[f.path].digest == md5_b64(mirror / f.path)
            assert Path(entries[f.path].local_path) == mirror / f.path
        expected = wandb.Artifact(out.artifact, type=out.type)
        expected.add_dir(str(mirror), policy="immutable")
        assert art.digest == expected.digest  # W&B's artifact digest of the same files
        marker = json.loads(wb.marker_path(paths, job.key).read_text())
        assert marker["outputs"][0]["wandb_digest"] == art.digest and marker["outputs"][0]["logged"]


def test_stages_resolve_each_other_through_the_local_mirror(study: dict[str, Any]) -> None:
    plan: Plan = study["plan"]
    paths: StudyPaths = study["paths"]
    store: LocalStore = study["lstore"]
    total = plan.stage_jobs("total")[0]
    version = store.get(store.job_outputs(total.key)["total"])
    assert json.loads((store.materialize(version.ref) / "value.json").read_text())["value"] == 18
    # offline lineage: the inputs are in the run's config and in wandb-run.json, to declare after sync
    [log] = offline_runs(paths, total.key)
    scale_refs = sorted(f"{j.outputs[0].artifact}:job-{j.key[:16]}" for j in plan.stage_jobs("scale"))
    configs = [config_of(r) for r in records_of(log, "config")]
    assert sorted([c["inputs"] for c in configs if "inputs" in c][-1]) == scale_refs
    marker = json.loads(wb.marker_path(paths, total.key).read_text())
    assert marker["mode"] == "offline" and marker["finished"] and not marker["errors"]
    assert sorted(f"{i['artifact']}:{i['alias']}" for i in marker["inputs"]) == scale_refs
    assert not any(i["linked"] for i in marker["inputs"])


def test_every_ended_run_drops_a_trigger_for_sync_watch(study: dict[str, Any]) -> None:
    plan: Plan = study["plan"]
    paths: StudyPaths = study["paths"]
    triggers = wandb_files.read_ready(paths)
    assert sorted(triggers) == sorted(j.key for j in plan.jobs)
    for job in plan.jobs:
        entry = json.loads(triggers[job.key].read_text())
        assert entry["run_id"] == wb.run_id("toy", job.key) and entry["ok"] is True
    assert not [p for p in (paths.dir / "wandb-ready").iterdir() if p.name.startswith(".")]  # no temporary files


def test_sync_dry_run_lists_the_study_run_dirs_producers_first_and_real_wandb_accepts_them(study: dict[str, Any]) -> None:
    plan: Plan = study["plan"]
    paths: StudyPaths = study["paths"]
    out = cli("sync", "toy", "--store", str(study["store"]), "--dry-run", cwd=study["work"], env=study["env"])
    assert out.returncode == 0, out.stderr
    commands = [line[2:].split() for line in out.stdout.splitlines() if line.startswith("$ ")]
    expected = [[str(offline_runs(paths, j.key)[0].parent) for j in plan.stage_jobs(s)] for s in ("emit", "scale", "total")]
    assert [c[2:] for c in commands] == expected and all(c[1] == "sync" for c in commands)
    assert "7 W&B runs to upload in 3 steps" in out.stdout
    # the real wandb 0.31 CLI finds exactly one run in each of these directories
    dirs = [d for cmd in commands for d in cmd[2:]]
    real = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", *dirs],
                          capture_output=True, text=True, env=study["env"], cwd=study["tmp"], timeout=120)
    assert "Would sync 7 run(s)" in real.stdout + real.stderr


def test_sync_runs_wandb_sync_on_the_real_run_dirs_and_declares_offline_inputs(
        study: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``wandb sync`` here is a FAKE executable (no W&B server can run here) that records its argv and
    marks each run synced the way wandb 0.31 does (``run-<id>.wandb.synced``); the public API is
    the FAKE ``FakeApi``."""
    from test_sync import FakeApi, fake_wandb_cli

    store = tmp_path / "store"
    shutil.copytree(study["store"], store, symlinks=True)
    paths = StudyPaths(store, "toy")
    calls = fake_wandb_cli(tmp_path, monkeypatch)
    api = FakeApi()
    report = sync_study(paths, echo=lambda _: None, api_factory=lambda: api)
    assert report.ok and len(report.synced) == 7
    plan: Plan = study["plan"]
    argvs = [json.loads(line)["argv"] for line in calls.read_text().splitlines()]
    assert argvs == [["sync", *(str(offline_runs(paths, j.key)[0].parent) for j in plan.stage_jobs(s))]
                     for s in ("emit", "scale", "total")]
    assert report.linked == 6 and len(api.uses) == 6  # 3 scale jobs x 1 input, total x 3 inputs
    total = plan.stage_jobs("total")[0]
    assert sorted(a for r, a in api.uses if r == f"me/test/{wb.run_id('toy', total.key)}") == sorted(
        f"me/test/{j.outputs[0].artifact}:job-{j.key[:16]}" for j in plan.stage_jobs("scale"))


def test_unreachable_wandb_falls_back_to_an_offline_run_and_the_job_completes(tmp_path: Path) -> None:
    """REAL wandb in online mode, with the canary key, against a closed local port (wandb's retries
    shortened through its own env settings): init fails, the job goes on with an offline run under
    the same id, which sync uploads later; the key is written nowhere."""
    spec = tmp_path / "one.yaml"
    spec.write_text("name: one\nlanguages: [en]\nstages:\n  emit: {params: {value: 2}}\n"
                    "tracking: {backend: wandb, project: test, mode: online}\nstage_package: toystages\n")
    env = wandb_env(tmp_path, WANDB_API_KEY=CANARY, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_HTTP_TIMEOUT="1",
                    WANDB__GRAPHQL_RETRY_MAX="1", WANDB__GRAPHQL_RETRY_WAIT_MIN_SECONDS="0.1",
                    WANDB__GRAPHQL_RETRY_WAIT_MAX_SECONDS="0.2", ORCHESTRATOR_WANDB_INIT_TIMEOUT="10")
    out = cli("submit", str(spec), "--store", str(tmp_path / "store"), cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    paths = StudyPaths(tmp_path / "store", "one")
    [key] = [p.name for p in (paths.dir / "jobs").iterdir()]
    log = paths.job(key).log.read_text()
    assert "could not start the online run: CommError" in log and "python -m orchestrator sync one" in log
    marker = json.loads(wb.marker_path(paths, key).read_text())
    assert marker["requested_mode"] == "online" and marker["mode"] == "offline" and marker["outputs"][0]["logged"]
    [run_log] = offline_runs(paths, key)
    assert [a.name for a in records_of(run_log, "artifact")] == ["one.emit.number"]
    assert [r.run_id for r in records_of(run_log, "run")] == [wb.run_id("one", key)]
    report = sync_study(paths, dry_run=True, echo=lambda _: None)
    assert [r.path for r in report.planned] == [run_log.parent]  # not the failed online attempt's directory
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert not [p for p in files if CANARY.encode() in p.read_bytes()] and CANARY not in out.stdout + out.stderr


# -------------------------------------------------------------------- the online path, faked
class FakeRun:
    """A FAKE ``wandb.Run``: records calls; ``fail`` names methods that raise like a lost connection."""

    def __init__(self, kwargs: dict[str, Any], root: Path, fail: set[str], client: FakeWandb) -> None:
        self.kwargs, self.fail, self.calls, self.client = kwargs, fail, [], client
        self.offline = kwargs["mode"] == "offline"
        prefix = "offline-run" if self.offline else "run"
        self.dir = str(root / "wandb" / f"{prefix}-20260101_000000-{kwargs['id']}" / "files")
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        self.config = self

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise wandb.errors.CommError(f"{name}: connection refused")

    def update(self, d: dict[str, Any], allow_val_change: bool | None = None) -> None:
        self._call("config.update", d, allow_val_change=allow_val_change)

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self._call("log", data, step=step)

    def use_artifact(self, artifact_or_name: str, type: str | None = None) -> Any:
        self._call("use_artifact", artifact_or_name, type=type)
        return SimpleNamespace(metadata={"orchestrator": {"digest": "not-the-local-one"}})

    def log_artifact(self, artifact_or_path: Any, aliases: list[str] | None = None) -> Any:
        self._call("log_artifact", artifact_or_path, aliases=aliases)
        return artifact_or_path

    def finish(self, exit_code: int | None = None) -> None:
        self._call("finish", exit_code=exit_code)  # a finish that fails leaves the id in use
        self.client.active.discard(self.kwargs["id"])



class FakeWandb:
    """A FAKE ``wandb`` module: the real ``Settings`` and ``Artifact`` classes, a fake ``init``."""

    Settings = wandb.Settings
    Artifact = wandb.Artifact

    def __init__(self, fail_init: set[str] = frozenset(), fail: set[str] = frozenset()) -> None:
        self.fail_init, self.fail, self.runs, self.inits = set(fail_init), set(fail), [], []
        self.active: set[str] = set()  # like wandb 0.31's service: one run per id, until finish or teardown
        self.teardowns = 0

    def init(self, **kwargs: Any) -> FakeRun:
        self.inits.append(kwargs)
        if kwargs["id"] in self.active:
            raise wandb.errors.Error(f"run ID {kwargs['id']} is in use")
        self.active.add(kwargs["id"])  # even when init then fails (as observed with wandb 0.31)
        if kwargs["mode"] in self.fail_init:
            raise wandb.errors.CommError("Failed to get resume status: connection refused")
        run = FakeRun(kwargs, Path(kwargs["dir"]), self.fail if kwargs["mode"] == "online" else set(), self)
        self.runs.append(run)
        return run

    def teardown(self, exit_code: int | None = None) -> None:
        inspect.signature(wandb.teardown).bind(exit_code)
        self.teardowns += 1
        self.active.clear()


REAL = {"log": wandb.Run.log, "use_artifact": wandb.Run.use_artifact, "log_artifact": wandb.Run.log_artifact,
        "finish": wandb.Run.finish}


def assert_real_api(fake: FakeWandb) -> None:
    """Every call the backend made binds to the real wandb 0.31 signature."""
    for kwargs in fake.inits:
        inspect.signature(wandb.init).bind(**kwargs)
        assert isinstance(kwargs["settings"], wandb.Settings)
    for run in fake.runs:
        for name, args, kwargs in run.calls:
            if name == "config.update":
                from wandb.sdk.wandb_config import Config
                inspect.signature(Config.update).bind(None, *args, **kwargs)
            else:
                inspect.signature(REAL[name]).bind(None, *args, **kwargs)


@pytest.fixture
def job(toy_spec: Path, tmp_path: Path) -> dict[str, Any]:
    """scale[language=en] of an online W&B study, its upstream output committed in a local store."""
    study, registry = load_study(toy_spec, ["tracking.backend=wandb", "tracking.project=test",
                                            "tracking.entity=me", "tracking.mode=online"])
    plan = build_plan(study, registry)
    root = tmp_path / "root"
    store = LocalStore(root / "artifacts")
    emit, scale = plan.stage_jobs("emit")[0], plan.stage_jobs("scale")[0]
    src = tmp_path / "src"
    src.mkdir()
    (src / "value.json").write_text('{"value": 3}')
    upstream = store.log(emit.outputs[0].artifact, "number", src, aliases=["study-toy", f"job-{emit.key[:16]}"],
                         producer=Producer(emit.key, "toy", "emit", emit.label))
    out = tmp_path / "out"
    out.mkdir()
    (out / "value.json").write_text('{"value": 6}')
    output = store.log(scale.outputs[0].artifact, "number", out, aliases=["study-toy", f"job-{scale.key[:16]}"],
                       producer=Producer(scale.key, "toy", "scale", scale.label, inputs=(upstream.ref,)))
    record = JobRecord.from_job(scale, plan, root)
    return {"record": record, "paths": StudyPaths(root, "toy"), "store": store, "emit": emit, "scale": scale,
            "input": upstream, "output": output}


def run_job_calls(job: dict[str, Any], fake: FakeWandb, messages: list[str]) -> wb.WandbRun:
    store: LocalStore = job["store"]
    run = wb.WandbRun(job["record"], job["paths"], wandb=fake, echo=messages.append)
    run.use_input(job["input"], store.materialize(job["input"].ref))
    run.log({"loss": 0.5}, step=1)
    run.log_output(job["output"], store.materialize(job["output"].ref))
    run.finish(ok=True)
    return run


def test_online_run_declares_inputs_with_use_artifact_and_logs_outputs(job: dict[str, Any]) -> None:
    fake, messages = FakeWandb(), []
    run_job_calls(job, fake, messages)
    assert_real_api(fake)
    [init] = fake.inits
    record: JobRecord = job["record"]
    assert {k: init[k] for k in ("project", "entity", "group", "job_type", "name", "id", "resume", "mode")} == {
        "project": "test", "entity": "me", "group": "toy", "job_type": "scale", "name": "scale[language=en]",
        "id": wb.run_id("toy", record.key), "resume": "allow", "mode": "online"}
    assert Path(init["dir"]) == job["paths"].job(record.key).dir
    assert init["config"]["job_key"] == record.key and init["config"]["params"] == record.params
    assert init["settings"].init_timeout == wb.INIT_TIMEOUT_S and init["settings"].finish_timeout == wb.FINISH_TIMEOUT_S
    [online] = fake.runs
    names = [c[0] for c in online.calls]
    assert names == ["use_artifact", "config.update", "log", "log_artifact", "finish"]
    emit = job["emit"]
    assert online.calls[0][1:] == ((f"{emit.outputs[0].artifact}:job-{emit.key[:16]}",), {"type": "number"})
    assert online.calls[2][1:] == (({"loss": 0.5},), {"step": 1})
    art, aliases = online.calls[3][1][0], online.calls[3][2]["aliases"]
    assert (art.name, art.type) == (job["output"].ref.name, "number")
    assert {"study-toy", f"job-{record.key[:16]}"} <= set(aliases)
    assert art.metadata["orchestrator"]["digest"] == job["output"].digest
    assert art.metadata["orchestrator"]["inputs"] == [str(job["input"].ref)]
    [entry] = art.manifest.entries.values()
    assert entry.local_path == str(job["store"].materialize(job["output"].ref) / "value.json")  # immutable: no copy
    assert online.calls[4][2] == {"exit_code": 0}
    assert any("digest" in m and "uses the local one" in m for m in messages)  # W&B's copy differs from the mirror
    marker = json.loads(wb.marker_path(job["paths"], record.key).read_text())
    assert marker["mode"] == "online" and marker["inputs"][0]["linked"] and marker["runs"][0]["uploaded"]
    assert json.loads((job["paths"].job(record.key).metrics).read_text().splitlines()[0])["loss"] == 0.5


def test_unreachable_at_start_falls_back_to_offline_with_the_same_id(job: dict[str, Any]) -> None:
    fake, messages = FakeWandb(fail_init={"online"}), []
    run_job_calls(job, fake, messages)
    assert_real_api(fake)
    assert [i["mode"] for i in fake.inits] == ["online", "offline"] and fake.inits[0]["id"] == fake.inits[1]["id"]
    assert fake.teardowns == 1
    [offline] = fake.runs
    assert [c[0] for c in offline.calls] == ["config.update", "log", "log_artifact", "finish"]  # no use_artifact
    assert any("could not start the online run" in m and "CommError" in m for m in messages)
    marker = json.loads(wb.marker_path(job["paths"], job["record"].key).read_text())
    assert marker["mode"] == "offline" and not marker["inputs"][0]["linked"] and marker["outputs"][0]["logged"]


def test_lost_connection_mid_run_continues_offline_and_nothing_is_lost(job: dict[str, Any]) -> None:
    fake, messages = FakeWandb(fail={"log", "finish"}), []
    run_job_calls(job, fake, messages)
    assert_real_api(fake)
    online, offline = fake.runs
    assert [c[0] for c in online.calls] == ["use_artifact", "config.update", "log", "finish"]
    assert fake.teardowns == 1  # the online run's finish failed too: its id was still in use
    assert [c[0] for c in offline.calls] == ["log", "log_artifact", "finish"]  # the failed log is retried offline
    assert offline.kwargs["id"] == online.kwargs["id"] and offline.kwargs["config"]["inputs"]
    marker = json.loads(wb.marker_path(job["paths"], job["record"].key).read_text())
    assert [(r["mode"], r["uploaded"]) for r in marker["runs"]] == [("online", False), ("offline", False)]
    assert len(marker["errors"]) == 2 and marker["outputs"][0]["logged"]


def test_reference_artifacts_record_file_uris_instead_of_uploading(job: dict[str, Any]) -> None:
    job["record"] = job["record"].model_copy(update={"tracking": job["record"].tracking.model_copy(
        update={"reference_artifacts": True})})
    fake = FakeWandb()
    run_job_calls(job, fake, [])
    art = next(c[1][0] for c in fake.runs[0].calls if c[0] == "log_artifact")
    [entry] = art.manifest.entries.values()
    mirror = job["store"].materialize(job["output"].ref)
    assert entry.ref == f"file://{mirror / 'value.json'}" and entry.path == "value.json"


def test_api_key_comes_from_env_or_dotenv_and_is_never_written(job: dict[str, Any], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "placeholder")  # restored (or removed) after the test
    monkeypatch.delenv("WANDB_API_KEY")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root: Path = job["record"].root
    (root / ".env").write_text(f"# W&B\nexport WANDB_API_KEY='{CANARY}'\nOTHER=1\n")
    env: dict[str, str] = {}
    assert wb.load_api_key(cwd, root, env=env) and env == {"WANDB_API_KEY": CANARY}
    (cwd / ".env").write_text("WANDB_API_KEY=from-cwd  # first wins\n")
    env = {}
    assert wb.load_api_key(cwd, root, env=env) and env["WANDB_API_KEY"] == "from-cwd"
    env = {"WANDB_API_KEY": "from-env"}
    assert wb.load_api_key(cwd, root, env=env) and env["WANDB_API_KEY"] == "from-env"
    (cwd / ".env").unlink()
    fake, messages = FakeWandb(fail_init={"online"}), []
    run_job_calls(job, fake, messages)  # an online run loads the store root's .env
    assert os.environ["WANDB_API_KEY"] == CANARY
    assert CANARY not in json.dumps(fake.inits[0]["config"]) + "\n".join(messages)
    leaked = [p for p in (root / "studies").rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert leaked == []


def test_wandb_mode_comes_from_the_spec_then_the_environment() -> None:
    assert wb.requested_mode("online", {"WANDB_MODE": "offline"}) == "online"
    assert wb.requested_mode(None, {"WANDB_MODE": "offline"}) == "offline"
    assert wb.requested_mode(None, {"WANDB_MODE": "dryrun"}) == "offline"
    assert wb.requested_mode(None, {}) == "online"
    assert wb.requested_mode(None, {"WANDB_MODE": "disabled"}) == "disabled"


def test_run_ids_are_stable_per_study_and_job_and_names_are_safe_for_wandb() -> None:
    key = "ab" * 32
    assert wb.run_id("toy", key) == wb.run_id("toy", key) != wb.run_id("other", key)
    assert len(wb.run_id("toy", key)) == 32
    assert wb.wandb_artifact_name("toy.prune.mask.language-en") == "toy.prune.mask.language-en"
    safe = wb.wandb_artifact_name("toy.prune.threshold=1.1,seed=2")
    assert wb.WANDB_NAME.match(safe) and safe != wb.wandb_artifact_name("toy.prune.threshold=1.1,seed=3")
    wandb.Artifact(safe, type="mask")  # accepted by the real class


def test_missing_wandb_is_an_error_that_says_how_to_install_it(job: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(OrchestratorError, match=r"pip install 'cross-lingual-subnets\[wandb\]'"):
        open_run(job["record"], job["paths"])


def test_plan_keeps_the_job_order_sync_relies_on(study: dict[str, Any]) -> None:
    jobs = read_plan(study["paths"])["jobs"]
    seen: set[str] = set()
    for j in jobs:
        assert set(j["deps"]) <= seen
        seen.add(j["key"])


# (a helper only these tests use, moved here from the package)
def md5_b64(path: Path) -> str:
    """A file's digest as W&B writes it in artifact manifests (base64 of the MD5)."""
    h = hashlib.md5()  # noqa: S324 - W&B's manifest format, not used for security
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return base64.b64encode(h.digest()).decode()


# ------------------------------------------------------------ media and tags, REAL offline wandb

def write_png(path: Path, color: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (8, 6), color).save(path)


def history_items(log: Path) -> dict[str, Any]:
    """Every key logged to the run's history with its last value; a media value (wandb writes its
    fields as nested keys ``[key, field]``) as a dict of its fields."""
    items: dict[str, Any] = {}
    for h in records_of(log, "history"):
        for i in h.item:
            key, *fields = list(i.nested_key) or [i.key]
            if fields:
                items.setdefault(key, {})["/".join(fields)] = json.loads(i.value_json)
            else:
                items[key] = json.loads(i.value_json)
    return items


def test_images_and_pages_of_an_output_are_logged_as_media_and_runs_get_tags(
        toy_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A REAL offline wandb run (in this process): an output version with two figures, a page that
    shows them by relative links, an SVG and a non-media file; the run shows the figures as
    ``wandb.Image`` and the pages as ``wandb.Html`` (their images inlined), and has the spec's tags."""
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb" / sub))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    study, registry = load_study(toy_spec, ["tracking.backend=wandb", "tracking.project=test", "tracking.mode=offline",
                                            "tracking.tags=[ablation, heads]"])
    plan = build_plan(study, registry)
    root = tmp_path / "root"
    store = LocalStore(root / "artifacts")
    emit = plan.stage_jobs("emit")[0]
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_png(src / "heads_overlap.png", (200, 10, 10))
    write_png(src / "sub" / "layers.png", (10, 200, 10))
    (src / "heads_overlap.pdf").write_bytes(b"%PDF-1.4 not shown")
    (src / "values.json").write_text("{}")
    (src / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>')
    (src / "report.html").write_text('<html><body><h1>Report</h1><img src="heads_overlap.png" alt="a">'
                                     '<img alt="b" src=\'sub/layers.png\'><img src="https://example.org/x.png"></body></html>')
    version = store.log(emit.outputs[0].artifact, "number", src, producer=Producer(emit.key, "toy", "emit", emit.label))
    paths = StudyPaths(root, "toy")
    messages: list[str] = []
    run = wb.WandbRun(JobRecord.from_job(emit, plan, root), paths, echo=messages.append)
    mirror = store.materialize(version.ref)
    run.log_output(version, mirror)
    run.finish(ok=True)
    wandb.teardown()
    [log] = offline_runs(paths, emit.key)
    [record] = records_of(log, "run")
    assert list(record.tags) == ["ablation", "heads", "toy"]  # the spec's, then the study's name
    items = history_items(log)
    out = emit.outputs[0].name
    assert {k for k in items if not k.startswith("_")} == {f"{out}/{n}" for n in
                                                           ("heads_overlap", "sub/layers", "drawing", "report")}
    files = log.parent / "files"
    for key, name in ((f"{out}/heads_overlap", "heads_overlap.png"), (f"{out}/sub/layers", "sub/layers.png")):
        assert items[key]["_type"] == "image-file" and (items[key]["width"], items[key]["height"]) == (8, 6)
        assert (files / items[key]["path"]).read_bytes() == (mirror / name).read_bytes()
    page = (files / items[f"{out}/report"]["path"]).read_text()
    assert items[f"{out}/report"]["_type"] == "html-file"
    inlined = base64.b64encode((mirror / "heads_overlap.png").read_bytes()).decode()
    assert f'src="data:image/png;base64,{inlined}"' in page and "src='data:image/png;base64," in page
    assert 'src="https://example.org/x.png"' in page and "<h1>Report</h1>" in page
    assert "<svg" in (files / items[f"{out}/drawing"]["path"]).read_text()
    marker = json.loads(wb.marker_path(paths, emit.key).read_text())
    assert marker["outputs"][0]["media"] == sorted(k for k in items if k.startswith(f"{out}/"))
    assert not marker["errors"] and not [m for m in messages if "media" in m]


def test_media_selection_limits_and_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.tracking import media

    monkeypatch.setattr(media, "MAX_FILES", 2)
    files = [("a.png", 10), ("a.jpg", 10), ("big.png", media.MAX_BYTES + 1), ("c.gif", 1), ("notes.txt", 5),
             ("x y.html", 3)]
    chosen, notes = media.select_media("figures", tmp_path, files)
    assert [(m.key, m.kind) for m in chosen] == [("figures/a", "image"), ("figures/a_png", "image")]
    assert any("big.png" in n and "in the artifact" in n for n in notes)
    assert any(n.startswith("c.gif and later files") for n in notes)
    assert media.media_key("figures", "x y.html") == "figures/x_y"
    # a page's links that leave the version, or name no image, stay as they are
    (tmp_path / "v").mkdir()
    write_png(tmp_path / "v" / "ok.png", (0, 0, 0))
    write_png(tmp_path / "outside.png", (0, 0, 0))
    page = '<img src="../outside.png"><img src="missing.png"><img src="ok.png?x=1"><img src="data:image/png;base64,AA">'
    out = media.inline_images(page, tmp_path / "v" / "p.html", tmp_path / "v")
    assert '<img src="../outside.png">' in out and '<img src="missing.png">' in out
    assert out.count("data:image/png;base64,") == 2 and "ok.png" not in out


def test_tags_are_checked_like_wandb_checks_them_and_tracking_never_changes_job_keys(toy_spec: Path) -> None:
    from orchestrator.errors import SpecError

    with pytest.raises(SpecError, match=r"tracking\.tags"):
        load_study(toy_spec, [f"tracking.tags=[ok, {'x' * 65}]"])
    with pytest.raises(SpecError, match=r"tracking\.tags"):
        load_study(toy_spec, ["tracking.tags=['']"])
    with pytest.raises(ValueError, match="64 characters"):  # the limit is wandb's own
        wandb.Settings(run_tags=("x" * 65,))
    wandb.Settings(run_tags=("x" * 64,))
    plain = build_plan(*load_study(toy_spec))
    tracked = build_plan(*load_study(toy_spec, ["tracking.backend=wandb", "tracking.mode=offline", "tracking.project=p",
                                                "tracking.tags=[a, b]", "tracking.reference_artifacts=true"]))
    assert [j.key for j in plain.jobs] == [j.key for j in tracked.jobs]
    assert plain.study.spec_hash() != tracked.study.spec_hash()  # recorded as provenance, not part of keys


STUCK_SERVICE = """
import os, signal, sys
import wandb
from orchestrator.cli import main
from orchestrator.procutil import children
run = wandb.init(mode="offline", project="p", dir=sys.argv[1])
run.finish()
service = children(os.getpid(), "wandb-core")
for pid in service:
    os.kill(pid, signal.SIGSTOP)  # it stops answering, as one stuck on a server that does not
print(" ".join(map(str, service)), flush=True)
sys.exit(main(["status", "nosuch", "--store", sys.argv[1]]))
"""


@pytest.mark.slow  # a real wandb run, then the bounded 10 s wait: about 30 s here
def test_no_command_waits_at_exit_on_a_wandb_service_that_stopped_answering(tmp_path: Path) -> None:
    """wandb's exit hook waits for its service process without a limit. A command whose process
    used wandb (here a finished offline run) and whose service then stops answering must still
    exit, with its own outcome, and leave no service behind: every command (``guarded``: main and
    the local executor's jobs) ends the tracking backends' services within a bounded time."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK_SERVICE, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=wandb_env(tmp_path), cwd=tmp_path)
    frozen: list[int] = []
    try:
        assert proc.stdout is not None
        frozen = [int(pid) for pid in proc.stdout.readline().split()]
        _, err = proc.communicate(timeout=90)
        assert frozen, "wandb started no service"
        assert proc.returncode == 2 and "no study 'nosuch'" in err, err
        assert ended_within(frozen, 10), "the wandb service was left running"  # killed by the command, gone soon after
    finally:
        proc.kill()
        kill_all(frozen)


NEVER_STARTS = """
import sys
import wandb
from wandb.sdk.lib.service import service_process
from orchestrator.cli import main
service_process.get_core_path = lambda: sys.argv[2]  # a wandb-core that never finishes starting
try:
    wandb.init(mode="offline", project="p", dir=sys.argv[1])
except Exception as e:
    print(f"wandb gave up: {type(e).__name__}", flush=True)
sys.exit(main(["status", "nosuch", "--store", sys.argv[1]]))
"""


@pytest.mark.slow  # wandb's own 2 s wait for the service's port file, and a real run's imports: about 10 s
def test_no_command_leaves_a_wandb_service_that_never_started(tmp_path: Path) -> None:
    """wandb gives up on a service that does not start in time but leaves its process running,
    holding the command's stdout and stderr: whoever reads them (a pipe, a CI log) would wait for
    good. The command ends it too."""
    core = tmp_path / "wandb-core"
    core.write_text("#!/bin/sh\nwhile :; do sleep 1; done\n")
    core.chmod(0o755)
    env = wandb_env(tmp_path, WANDB_X_SERVICE_WAIT="2", WANDB_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", NEVER_STARTS, str(tmp_path), str(core)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=60)  # returns only once every holder of the pipes has gone
        assert "wandb gave up: ServicePollForTokenError" in out, out + err
        assert proc.returncode == 2 and "no study 'nosuch'" in err, err
    finally:
        proc.kill()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):  # the fake, should it be left
            with contextlib.suppress(OSError):
                if str(core).encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
