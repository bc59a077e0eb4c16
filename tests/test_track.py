"""``python -m orchestrator track STUDY``: a study run with local tracking, mirrored to W&B afterwards.

REAL wandb 0.31 in offline mode throughout: the toy study runs through the real CLI with
``tracking.backend=local`` (plus a stage that always fails, so one job has nothing committed), then
``track`` makes the W&B runs; the tests read what wandb wrote (the offline runs' ``.wandb``
transaction logs, decoded with wandb's own protobuf ``Record``), the markers ``sync`` reads, the
study index, and check that the store and the jobs' own files are exactly as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import TOY_SPEC
from test_tracking_wandb import cli, config_of, md5_b64, offline_runs, records_of, wandb_env

from orchestrator.artifacts import ArtifactRef, JobCommit, LocalStore
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan, build_plan
from orchestrator.records import read_job_record, read_plan
from orchestrator.spec import load_study
from orchestrator.sync import levels, sync_study
from orchestrator.tracking import wandb as wb
from orchestrator.tracking.index import (
    INDEX_KEY,
    BadIndex,
    build_index,
    index_artifact_name,
    index_dir,
    parse_index,
    with_index_job,
)
from orchestrator.tracking.mirror import JobRecords, already_mirrored, metric_rows, tracking_for

pytest.importorskip("wandb")

LOCAL_SPEC = TOY_SPEC.replace("stage_package:", "  broken:\n    stage: flaky\n    params: {fail_times: -1}\nstage_package:")


def snapshot(paths: StudyPaths, keys: list[str]) -> dict[str, Any]:
    """Every record of the store (versions, aliases, job records, blob names) and every file each
    job wrote itself (log, state, metrics, job.json), with its content digest and mtime."""
    store = paths.store
    files = [p for sub in ("artifacts", "jobs") for p in (store / sub).rglob("*.json")]
    files += [paths.job(k).dir / n for k in keys for n in ("job.log", "state.json", "metrics.jsonl", "job.json")]
    return {
        "files": {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files if p.exists()},
        "blobs": sorted(str(p.relative_to(store)) for p in (store / "objects").rglob("*") if p.is_file()),
    }


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The toy study (+ ``broken``) run once with local tracking, then ``track`` (a dry run first)."""
    tmp = tmp_path_factory.mktemp("track-study")
    work, store = tmp / "work", tmp / "store"
    work.mkdir()
    spec = work / "toy.yaml"
    spec.write_text(LOCAL_SPEC)
    env = wandb_env(tmp, WANDB_MODE="offline")
    sub = cli("submit", str(spec), "--store", str(store), cwd=work, env=env)
    assert sub.returncode == 1 and "broken" in sub.stdout + sub.stderr, sub.stdout + sub.stderr  # it fails on purpose
    s, registry = load_study(spec, [f"storage.root={store}"])
    plan = build_plan(s, registry)
    paths = StudyPaths(store, "toy")
    committed = [j.key for j in plan.jobs if j.stage_id != "broken"]
    assert not list(paths.dir.rglob("wandb-run.json"))  # tracked locally: nothing for W&B yet
    before = snapshot(paths, [j.key for j in plan.jobs])
    dry = cli("track", "toy", "--store", str(store), "--project", "test", "--dry-run", cwd=work, env=env)
    after_dry = snapshot(paths, [j.key for j in plan.jobs]), sorted(str(p) for p in store.rglob("*"))
    out = cli("track", "toy", "--store", str(store), "--project", "test", "--mode", "offline", cwd=work, env=env)
    return {"tmp": tmp, "work": work, "store": store, "env": env, "plan": plan, "paths": paths, "committed": committed,
            "before": before, "after_dry": after_dry, "dry": dry, "out": out, "lstore": LocalStore(store / "artifacts")}


def test_track_mirrors_every_committed_job_and_reports_the_one_that_failed(tracked: dict[str, Any]) -> None:
    out, plan = tracked["out"], tracked["plan"]
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.removeprefix("mirrored ") for line in lines if line.startswith("mirrored ")] == [
        j.label for j in plan.jobs if j.stage_id != "broken"]  # in plan order
    assert "not committed broken: no committed outputs (job failed)" in lines
    assert "7 mirrored, 0 skipped, 1 not committed, 0 failed" in lines
    assert "upload them with: python -m orchestrator sync toy" in out.stdout
    broken = plan.stage_jobs("broken")[0]
    assert not wb.marker_path(tracked["paths"], broken.key).exists() and not offline_runs(tracked["paths"], broken.key)
    assert "wandb: " not in out.stderr  # wandb's own banners only with -v


def test_the_dry_run_says_what_would_be_mirrored_and_writes_nothing(tracked: dict[str, Any]) -> None:
    dry = tracked["dry"]
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "7 to mirror, 0 skipped, 1 not committed, 0 failed" in dry.stdout
    assert "would mirror total" in dry.stdout and "index: would be logged (7 jobs, 7 versions)" in dry.stdout
    snap, files = tracked["after_dry"]
    assert snap == tracked["before"]
    assert not [f for f in files if "wandb" in Path(f).name or "materialized/toy.total" in f]


def test_one_offline_run_per_job_with_the_live_run_id_group_job_type_name_and_config(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    plan: Plan = tracked["plan"]
    for job in plan.jobs:
        if job.stage_id == "broken":
            continue
        [log] = offline_runs(paths, job.key)
        [run] = records_of(log, "run")
        assert run.run_id == wb.run_id("toy", job.key) and log.parent.name.endswith(run.run_id)
        assert (run.project, run.run_group, run.job_type, run.display_name) == ("test", "toy", job.stage_id, job.label)
        assert "toy" in run.tags
        record = read_job_record(paths.job(job.key).record)  # what the job ran with
        config = config_of(run)
        assert {k: config[k] for k in ("job_key", "label", "seed", "stage", "stage_id", "stage_version", "spec_hash")} == {
            "job_key": record.key, "label": record.label, "seed": record.seed, "stage": record.stage,
            "stage_id": record.stage_id, "stage_version": record.stage_version, "spec_hash": record.spec_hash}
        assert config["params"] == json.loads(json.dumps(record.params)) and config["point"] == record.point
        marker = json.loads(wb.marker_path(paths, job.key).read_text())
        assert marker["finished"] and marker["mirrored"] and not marker["errors"] and marker["mode"] == "offline"
        assert marker["runs"] == [{"dir": str(log.parent.relative_to(paths.job(job.key).dir)), "mode": "offline",
                                   "uploaded": False}]


def test_metrics_are_replayed_with_their_wall_times(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    store: LocalStore = tracked["lstore"]
    for key in tracked["committed"]:
        rows = [json.loads(line) for line in paths.job(key).metrics.read_text().splitlines()]
        [log] = offline_runs(paths, key)
        history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item} for h in records_of(log, "history")]
        assert [{"value": h["value"], "_timestamp": h["_timestamp"]} for h in history] == [
            {"value": r["value"], "_timestamp": r["time"]} for r in rows]
        [output] = store.job_outputs(key).values()
        assert history[-1]["value"] == store.get(output).metadata["value"]


def test_outputs_are_logged_as_the_live_run_logs_them(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    store: LocalStore = tracked["lstore"]
    for key in tracked["committed"]:
        [log] = offline_runs(paths, key)
        [art] = records_of(log, "artifact")
        [version] = [store.get(r) for r in store.job_outputs(key).values()]
        assert (art.name, art.type) == (wb.wandb_artifact_name(version.ref.name), version.type)
        assert {"study-toy", f"job-{key[:16]}", "latest"} <= set(art.aliases)
        meta = json.loads(art.metadata)
        assert meta["orchestrator"]["digest"] == version.digest and meta["orchestrator"]["job_key"] == key
        assert meta["orchestrator"]["ref"] == str(version.ref) and meta["value"] == version.metadata["value"]
        view = store.materialize(version.ref)  # the store's read-only verified copy: no staging copy
        entries = {e.path: e for e in art.manifest.contents}
        assert sorted(entries) == sorted(f.path for f in version.files)
        for f in version.files:
            assert entries[f.path].digest == md5_b64(view / f.path) and Path(entries[f.path].local_path) == view / f.path
        [entry] = json.loads(wb.marker_path(paths, key).read_text())["outputs"]
        assert entry["ref"] == str(version.ref) and entry["logged"] and entry["wandb_digest"] == art.digest


def test_inputs_are_the_versions_each_job_consumed_recorded_for_sync(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    plan: Plan = tracked["plan"]
    store: LocalStore = tracked["lstore"]
    total = plan.stage_jobs("total")[0]
    expected = [f"{j.outputs[0].artifact}:job-{j.key[:16]}" for j in plan.stage_jobs("scale")]  # binding order
    [log] = offline_runs(paths, total.key)
    configs = [config_of(r) for r in records_of(log, "config")]
    assert [c["inputs"] for c in configs if "inputs" in c][-1] == expected
    marker = json.loads(wb.marker_path(paths, total.key).read_text())
    assert [f"{i['artifact']}:{i['alias']}" for i in marker["inputs"]] == expected
    assert [i["ref"] for i in marker["inputs"]] == [str(r) for r in store.job_record(total.key).inputs["numbers"]]
    assert not any(i["linked"] for i in marker["inputs"])  # offline: sync declares them after the upload


def test_nothing_in_the_store_or_the_jobs_own_files_changed_and_nothing_ran(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    assert snapshot(paths, [j.key for j in tracked["plan"].jobs]) == tracked["before"]
    for key in tracked["committed"]:
        assert "running stage" in paths.job(key).log.read_text()  # its one run, from submit
        assert paths.job(key).log.read_text().count("running stage") == 1
    assert not list((paths.root / "staging").glob("*/*"))


def test_sync_dry_run_lists_the_mirrored_runs_producers_first_and_real_wandb_accepts_them(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    plan: Plan = tracked["plan"]
    out = cli("sync", "toy", "--store", str(tracked["store"]), "--dry-run", cwd=tracked["work"], env=tracked["env"])
    assert out.returncode == 0, out.stderr
    commands = [line[2:].split()[2:] for line in out.stdout.splitlines() if line.startswith("$ ")]
    expected = [[str(offline_runs(paths, j.key)[0].parent) for j in plan.stage_jobs(s)] for s in ("emit", "scale", "total")]
    [index_log] = sorted(index_dir(paths).glob("wandb/offline-run-*/run-*.wandb"))
    assert commands[:3] == expected and commands[3:] in ([], [[str(index_log.parent)]])  # the index, once sync reads it
    dirs = [d for batch in expected for d in batch] + [str(index_log.parent)]
    real = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", *dirs],
                          capture_output=True, text=True, env=tracked["env"], cwd=tracked["tmp"], timeout=120)
    assert "Would sync 8 run(s)" in real.stdout + real.stderr


def test_sync_uploads_the_mirrored_runs_and_declares_their_inputs(
        tracked: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``wandb sync`` here is the FAKE executable of test_sync.py (no W&B server here; it records its
    argv and marks runs synced like wandb 0.31), the public API the FAKE ``FakeApi``."""
    from test_sync import FakeApi, calls, fake_wandb_cli

    store = tmp_path / "store"
    shutil.copytree(tracked["store"], store, symlinks=True)
    paths = StudyPaths(store, "toy")
    log = fake_wandb_cli(tmp_path, monkeypatch)
    api = FakeApi()
    report = sync_study(paths, echo=lambda _: None, api_factory=lambda: api)
    assert report.ok and {r.job_key for r in report.synced} >= set(tracked["committed"])
    plan: Plan = tracked["plan"]
    assert [c["argv"][1:] for c in calls(log)][:3] == [
        [str(offline_runs(paths, j.key)[0].parent) for j in plan.stage_jobs(s)] for s in ("emit", "scale", "total")]
    assert report.linked == 6  # 3 scale jobs x 1 input, total x 3: W&B's lineage graph is the study's DAG
    total = plan.stage_jobs("total")[0]
    assert sorted(a for r, a in api.uses if r == f"me/test/{wb.run_id('toy', total.key)}") == sorted(
        f"me/test/{j.outputs[0].artifact}:job-{j.key[:16]}" for j in plan.stage_jobs("scale"))


def test_the_index_run_logs_the_study_index_that_pull_reads(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    plan: Plan = tracked["plan"]
    store: LocalStore = tracked["lstore"]
    [log] = sorted(index_dir(paths).glob("wandb/offline-run-*/run-*.wandb"))
    [run] = records_of(log, "run")
    assert (run.run_id, run.run_group, run.job_type) == (wb.run_id("toy", INDEX_KEY), "toy", "orchestrator-index")
    [art] = records_of(log, "artifact")
    assert (art.name, art.type) == (index_artifact_name("toy"), "orchestrator-index")
    assert art.name == "toy.orchestrator-index"
    assert {"latest", "study-toy"} <= set(art.aliases)
    [entry] = art.manifest.contents
    assert entry.path == "index.json"
    index = parse_index(json.loads(Path(entry.local_path).read_text()))  # W&B's staged copy, as uploaded
    assert index.study == "toy" and index.plan == read_plan(paths)
    assert [j.key for j in index.jobs] == tracked["committed"]  # plan order; not the broken job
    for job in index.jobs:
        raw = json.loads((store.root / "jobs" / f"{job.key}.json").read_text())
        assert job.record == raw and job.run_id == wb.run_id("toy", job.key) and job.label == plan.by_key[job.key].label
    outputs = [r for k in tracked["committed"] for r in store.job_outputs(k).values()]
    assert sorted(v.ref for v in index.versions) == sorted(outputs)
    for v in index.versions:
        raw = json.loads((store.root / "artifacts" / v.ref.name / "versions" / f"v{v.ref.version}" / "version.json").read_text())
        assert v.record == raw and v.digest == store.get(v.ref).digest
        assert v.wandb_ref == f"{v.ref.name}:job-{store.get(v.ref).producer.job_key[:16]}"
    positions = {v.ref: i for i, v in enumerate(index.versions)}
    for job in index.jobs:  # lineage order: a version's inputs before it
        for ref in job.outputs.values():
            assert all(positions[i] < positions[ref] for refs in (job.inputs or {}).values() for i in refs)


def test_a_second_track_skips_everything(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    runs = sorted(paths.dir.rglob("offline-run-*"))
    again = cli("track", "toy", "--store", str(tracked["store"]), "--project", "test", "--mode", "offline",
                cwd=tracked["work"], env=tracked["env"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 mirrored, 7 skipped, 1 not committed, 0 failed" in again.stdout
    assert "skipped  total: already in W&B" in again.stdout and "index: unchanged (7 jobs, 7 versions)" in again.stdout
    assert sorted(paths.dir.rglob("offline-run-*")) == runs


def test_force_mirrors_again_into_the_same_run_ids(tracked: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tracked["store"], store, symlinks=True)
    out = cli("track", "toy", "--store", str(store), "--project", "test", "--mode", "offline", "--force",
              cwd=tracked["work"], env=tracked["env"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "7 mirrored, 0 skipped, 1 not committed, 0 failed" in out.stdout and "index: logged" in out.stdout
    paths = StudyPaths(store, "toy")
    for key in tracked["committed"]:
        logs = offline_runs(paths, key)
        assert len(logs) == 2 and {records_of(g, "run")[0].run_id for g in logs} == {wb.run_id("toy", key)}
        assert len(json.loads(wb.marker_path(paths, key).read_text())["runs"]) == 2  # sync uploads both


def test_no_project_is_a_one_line_error(tracked: dict[str, Any]) -> None:
    out = cli("track", "toy", "--store", str(tracked["store"]), cwd=tracked["work"], env=tracked["env"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("error: study 'toy' names no W&B project (its spec has no tracking.project); "
                                  "pass --project NAME")
    nope = cli("track", "nope", "--store", str(tracked["store"]), "--project", "p", cwd=tracked["work"], env=tracked["env"])
    assert nope.returncode == 2 and "no study 'nope'" in nope.stderr


def test_settings_come_from_the_options_else_the_submitted_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = {"study": "s", "spec": {"tracking": {"backend": "local", "project": "p", "entity": "e", "mode": "offline"}}}
    t = tracking_for(plan, None, None, None)
    assert (t.backend, t.project, t.entity, t.mode) == ("wandb", "p", "e", "offline")
    t = tracking_for(plan, "q", "f", "online")
    assert (t.project, t.entity, t.mode) == ("q", "f", "online")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(Exception, match="pass --mode offline or --mode online"):
        tracking_for({"spec": {"tracking": {"project": "p"}}}, None, None, None)


def test_a_job_without_job_json_gets_the_record_its_executor_would_have_written(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    plan = read_plan(paths)
    tracking = tracking_for(plan, "test", None, "offline")
    records = JobRecords(paths, plan, tracking)
    for key in tracked["committed"]:
        ran_with = records.get(key)
        rebuilt = records._from_plan(key).model_copy(update={"root": paths.root, "tracking": tracking})
        assert rebuilt == ran_with


def test_a_job_counts_as_mirrored_only_with_its_current_outputs_logged_in_this_project() -> None:
    commit = JobCommit(outputs={"number": ArtifactRef("toy.emit.number.language-en", 1)}, inputs={})
    tracking = tracking_for({"spec": {"tracking": {"project": "test"}}}, None, None, "offline")
    live = {"finished": True, "project": "test", "entity": None,
            "outputs": [{"ref": "toy.emit.number.language-en:v1", "logged": True}]}  # as WandbRun leaves it
    assert already_mirrored(live, commit, tracking)
    assert not already_mirrored({**live, "project": "other"}, commit, tracking)
    assert not already_mirrored({**live, "finished": False}, commit, tracking)  # killed mid-run
    assert not already_mirrored({**live, "outputs": [{"ref": "toy.emit.number.language-en:v0", "logged": True}]},
                                commit, tracking)  # rerun since: a new version
    assert not already_mirrored({**live, "outputs": [{"ref": "toy.emit.number.language-en:v1", "logged": False}]},
                                commit, tracking)  # W&B failed then
    assert not already_mirrored(None, commit, tracking)


def test_metric_rows_keep_steps_times_and_non_finite_values(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 3, "time": 1.5, "loss": 0.25}\n{"step": null, "time": 2.0, "loss": null}\n{"step": 4, "lo')
    rows = list(metric_rows(path))
    assert rows[0] == ({"loss": 0.25}, 3, 1.5)
    assert rows[1][1:] == (None, 2.0) and math.isnan(rows[1][0]["loss"])
    assert len(rows) == 2  # the torn last line of a killed job is skipped
    assert list(metric_rows(tmp_path / "none.jsonl")) == []  # a job that logged nothing (or ran elsewhere)


def test_sync_uploads_the_index_run_after_every_job(tracked: dict[str, Any]) -> None:
    paths: StudyPaths = tracked["paths"]
    jobs = read_plan(paths)["jobs"]
    entries = with_index_job(paths, jobs)
    assert entries[:-1] == jobs and entries[-1]["key"] == INDEX_KEY
    depth = levels(entries)
    assert depth[INDEX_KEY] == max(depth.values()) > max(depth[j["key"]] for j in jobs)


# ------------------------------------------------------------------------------- the index format
@pytest.fixture(scope="module")
def index_data(tracked: dict[str, Any]) -> dict[str, Any]:
    return build_index(tracked["paths"], tracked["lstore"])


def test_build_index_lists_every_committed_job_by_default(index_data: dict[str, Any], tracked: dict[str, Any]) -> None:
    assert index_data["format"] == 1 and [j["key"] for j in index_data["jobs"]] == tracked["committed"]
    assert len(parse_index(json.loads(json.dumps(index_data))).versions) == 7


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: d.update(format=2), "has format 2; this version reads format 1"),
    (lambda d: d.pop("plan"), "'plan' is missing or not a dict"),
    (lambda d: d["plan"].update(study="other"), "plan is not the plan of study 'toy'"),
    (lambda d: d["versions"][0]["record"].update(digest="0" * 64), "versions[0] (toy.emit.number.language-en:v0): its digest"),
    (lambda d: d["versions"][0]["record"]["files"][0].update(path="../x"), "versions[0] (toy.emit.number.language-en:v0): its record is invalid: file path '../x'"),
    (lambda d: d["versions"][0].update(ref="toy.emit:latest"), "not an artifact version reference"),
    (lambda d: d["versions"][0]["wandb"].update(alias="a:b"), "is not a W&B artifact name and alias"),
    (lambda d: d["versions"].append(copy.deepcopy(d["versions"][0])), "lists a version twice"),
    (lambda d: d["versions"].pop(0), "names versions it does not list: toy.emit.number.language-en:v0"),
    (lambda d: d["jobs"][0].update(run_id="x" * 32), "is not the job's run id in study 'toy'"),
    (lambda d: d["jobs"][0]["record"].update(outputs=[]), "its record is invalid: its 'outputs' is missing or not an object"),
    (lambda d: d["jobs"][0].update(key="f" * 64, run_id=wb.run_id("toy", "f" * 64),
                                   record={**d["jobs"][0]["record"], "job_key": "f" * 64}), "which its plan does not have"),
    (lambda d: d["jobs"][0]["record"].pop("job_key"), "its record is not job"),
])
def test_parse_index_refuses_a_malformed_index_saying_where(index_data: dict[str, Any], damage: Any, message: str) -> None:
    data = copy.deepcopy(index_data)
    damage(data)
    with pytest.raises(BadIndex) as e:
        parse_index(data)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadIndex, match="not a JSON object"):
        parse_index([])
