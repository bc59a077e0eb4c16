"""The runner: lineage resolution, provenance, outputs committed only when the stage succeeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.executors import LocalExecutor
from orchestrator.paths import StudyPaths
from orchestrator.plan import build_plan
from orchestrator.provenance import code_provenance
from orchestrator.records import JobRecord, write_job_record
from orchestrator.runner import EXIT_FAILED, EXIT_OK, open_store, resolve_inputs, run_job
from orchestrator.spec import load_study


@pytest.fixture
def toy_run(toy_spec: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    study, registry = load_study(toy_spec)
    plan = build_plan(study, registry)
    root = tmp_path / "root"
    paths = StudyPaths(root, study.name)
    ex = LocalExecutor(paths, open_store(root), echo=lambda _: None)
    return plan, paths, ex


def test_inputs_resolve_to_the_exact_version_the_upstream_job_produced(toy_run, toy_spec: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plan, paths, ex = toy_run
    assert ex.submit(plan, toy_spec).ok
    store = ex.store
    emit_en = next(j for j in plan.jobs if j.label == "emit[language=en]")
    produced = store.job_outputs(emit_en.key)["number"]
    # another version of the same artifact appears later (e.g. a different study): lineage ignores it
    other = tmp_path / "other"
    other.mkdir()
    (other / "value.json").write_text('{"value": 999}')
    newer = store.log(emit_en.outputs[0].artifact, "number", other)
    assert newer.ref.version == produced.version + 1
    scale_en = next(j for j in plan.jobs if j.label == "scale[language=en]")
    record = JobRecord.from_job(scale_en, plan, paths.root)
    resolved = resolve_inputs(store, record)
    assert resolved["number"].ref == str(produced)
    assert json.loads((resolved["number"].path / "value.json").read_text())["value"] == 3


def test_provenance_and_lineage_on_every_artifact(toy_run, toy_spec: Path) -> None:  # type: ignore[no-untyped-def]
    plan, paths, ex = toy_run
    ex.submit(plan, toy_spec)
    total = plan.jobs[-1]
    version = ex.store.get(ex.store.job_outputs(total.key)["total"])
    producer = version.producer
    assert producer is not None and producer.job_key == total.key and producer.stage == "total"
    assert sorted(str(r) for r in producer.inputs) == sorted(
        str(ex.store.job_outputs(j.key)["number"]) for j in plan.stage_jobs("scale")
    )
    prov = producer.provenance
    assert prov["spec_hash"] == plan.study.spec_hash() and prov["job_key"] == total.key
    assert prov["seed"] == 1234 and "pydantic" in prov["packages"]
    assert "git_commit" in prov
    assert prov["stage_version"] == total.stage_version and prov["params"] == dict(total.params)  # the job, whole
    # the code part, handed to the job by the submitting process, is what this process computes
    job_part = ("spec_hash", "job_key", "seed", "stage_version", "params")
    assert {k: v for k, v in prov.items() if k not in job_part} == code_provenance()
    assert set(version.aliases) >= {"study-toy", f"job-{total.key[:16]}", "latest"}
    assert version.metadata == {"value": 18.0}


def test_a_failing_stage_commits_nothing(toy_run, toy_spec: Path) -> None:  # type: ignore[no-untyped-def]
    plan, paths, ex = toy_run
    study, registry = load_study(toy_spec, ["stages.scale.params.fail=true"])
    plan = build_plan(study, registry)
    for job in plan.stage_jobs("emit"):
        write_job_record(paths, JobRecord.from_job(job, plan, paths.root))
        assert run_job(paths.job(job.key).record) == EXIT_OK
    job = plan.stage_jobs("scale")[0]
    write_job_record(paths, JobRecord.from_job(job, plan, paths.root))
    assert run_job(paths.job(job.key).record) == EXIT_FAILED
    assert ex.store.job_outputs(job.key) is None
    assert "toy.scale.number.language-en" not in ex.store.names()


def test_missing_upstream_output_is_a_clear_error(toy_run) -> None:  # type: ignore[no-untyped-def]
    plan, paths, ex = toy_run
    job = plan.stage_jobs("scale")[0]
    write_job_record(paths, JobRecord.from_job(job, plan, paths.root))
    from orchestrator.errors import OrchestratorError

    with pytest.raises(OrchestratorError, match="upstream job .* has no committed output 'number'; submit the study"):
        run_job(paths.job(job.key).record)


def test_rerun_of_a_committed_job_is_a_no_op(toy_run, toy_spec: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    plan, paths, ex = toy_run
    job = plan.jobs[0]
    write_job_record(paths, JobRecord.from_job(job, plan, paths.root))
    assert run_job(paths.job(job.key).record) == EXIT_OK
    assert run_job(paths.job(job.key).record) == EXIT_OK
    assert "outputs already committed; nothing to do" in capsys.readouterr().out
