"""A study's records on disk: its plan, each job's run record and each job's state.

Executors write them, the runner reads the job record, ``status`` reads them all. Every write is
atomic, so a reader never sees a half-written record.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from orchestrator.fsutil import atomic_write_json, read_json
from orchestrator.paths import StudyPaths
from orchestrator.plan import Job, Plan
from orchestrator.resources import Resources
from orchestrator.spec import TrackingSpec

# "timeout": the local executor stopped the job when it ran past its resources.time_min (a failure)
State = Literal["pending", "queued", "running", "succeeded", "failed", "cancelled", "skipped", "cached", "interrupted", "timeout"]


class UpstreamRecord(BaseModel):
    job_key: str
    output: str
    point: dict[str, Any]


class BindingRecord(BaseModel):
    name: str
    type: str
    many: bool
    upstream: list[UpstreamRecord]


class OutputRecord(BaseModel):
    name: str
    type: str
    artifact: str


class JobRecord(BaseModel):
    """Everything the runner needs to run one job, with no access to the spec."""

    model_config = ConfigDict(extra="forbid")

    key: str
    label: str
    study: str
    stage_id: str
    stage: str
    stage_version: str
    stage_package: str
    params: dict[str, Any]
    seed: int
    point: dict[str, Any]
    inputs: list[BindingRecord]
    outputs: list[OutputRecord]
    root: Path
    spec_hash: str
    tracking: TrackingSpec
    spec_path: str | None = None  # the spec file submitted (None: a plan built in code)
    resources: Resources = Resources()  # what the job was given (ExecutorSpec.resources_for its point)

    @classmethod
    def from_job(cls, job: Job, plan: Plan, root: Path) -> JobRecord:
        return cls.model_validate(record_dict(job, plan, root, plan.study.spec_hash()))


def record_dict(job: Job, plan: Plan, root: Path, spec_hash: str, spec_path: Path | None = None) -> dict[str, Any]:
    """A job's record as plain JSON data (what JobRecord validates): cheap to build by the thousand."""
    study = plan.study
    return {
        "key": job.key,
        "label": job.label,
        "study": study.name,
        "stage_id": job.stage_id,
        "stage": job.stage,
        "stage_version": job.stage_version,
        "stage_package": study.stage_package,
        "params": dict(job.params),
        "seed": job.seed,
        "point": dict(job.point),
        "inputs": [
            {
                "name": b.name,
                "type": b.type,
                "many": b.many,
                "upstream": [{"job_key": u.job_key, "output": u.output, "point": dict(u.point)} for u in b.upstream],
            }
            for b in job.inputs
        ],
        "outputs": [{"name": o.name, "type": o.type, "artifact": o.artifact} for o in job.outputs],
        "root": str(root),
        "spec_hash": spec_hash,
        "tracking": study.tracking.model_dump(mode="json"),
        "spec_path": None if spec_path is None else str(spec_path),
        "resources": study.executor.resources_for(job.stage_id, job.point).model_dump(mode="json", exclude_defaults=True),
    }


class JobState(BaseModel):
    state: State
    updated_at: str
    exit_code: int | None = None
    executor: str | None = None
    external_id: str | None = None  # pid or SLURM job id
    message: str | None = None
    attempt: int | None = None  # which attempt runs (or ran last) where resources.retries allows several; None: the first


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_job_record(paths: StudyPaths, record: JobRecord) -> Path:
    path = paths.job(record.key).record
    atomic_write_json(path, record.model_dump(mode="json"), durable=False)
    return path


def read_job_record(path: Path) -> JobRecord:
    return JobRecord.model_validate(read_json(path))


def write_state(paths: StudyPaths, key: str, state: State, **fields: Any) -> None:
    state_doc = JobState(state=state, updated_at=now(), **fields).model_dump(mode="json")
    atomic_write_json(paths.job(key).state, state_doc, durable=False)


def read_state(paths: StudyPaths, key: str) -> JobState | None:
    path = paths.job(key).state
    return JobState.model_validate(read_json(path)) if path.exists() else None


def recorded_attempt(paths: StudyPaths, key: str) -> int | None:
    """The attempt a job's state records (the runner notes each retry there), to carry it into
    the state that follows; None where there is none or it cannot be read."""
    try:
        state = read_state(paths, key)
    except (OSError, ValueError):
        return None
    return state.attempt if state else None


def write_plan(paths: StudyPaths, plan: Plan, spec_path: Path) -> None:
    """The submitted plan: what ``status`` and ``artifacts`` read later, without the spec file."""
    atomic_write_json(
        paths.plan,
        {
            "study": plan.study.name,
            "spec_path": str(spec_path),
            "spec_hash": plan.study.spec_hash(),
            "spec": plan.study.model_dump(mode="json"),
            "submitted_at": now(),
            "jobs": [plan_entry(j) for j in plan.jobs],
        },
        compact=True,  # thousands of jobs; `plan` and `status` show it to people
    )


def plan_entry(job: Job) -> dict[str, Any]:
    """One job as plan.json lists it (what status, artifacts and sync read back)."""
    return {
        "key": job.key,
        "label": job.label,
        "stage_id": job.stage_id,
        "stage": job.stage,
        "point": dict(job.point),
        "deps": list(job.deps),
        "outputs": {o.name: o.artifact for o in job.outputs},
    }


def read_plan(paths: StudyPaths) -> dict[str, Any]:
    return read_json(paths.plan)
