"""A study's jobs and outputs as plain data, built once: ``views`` renders them as the ``status``
and ``artifacts`` tables, ``--json`` prints them as one JSON document, ``orchestrator.api``
returns them. Reads the study's records and (read-only) its artifact store; writes nothing.

To show something new about each job (a column of ``status``), add a field to ``JobStatus``, set
it in ``study_status`` and add it to ``JobStatus.to_dict`` and to ``views.STATUS_COLUMNS``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactError, ArtifactStore, ArtifactVersion
from orchestrator.artifacts.describe import version_dict
from orchestrator.errors import BadArgument
from orchestrator.executors.base import StatusView
from orchestrator.paths import StudyPaths
from orchestrator.progress import JobProgress
from orchestrator.progress_study import StudyProgress, study_progress
from orchestrator.records import JobState, read_plan, read_state

FAILED_STATES = ("failed", "timeout")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure|Warning)\b.*$")


@dataclass
class JobStatus:
    """One job of a submitted study: what it is, its state and where it runs, its log, and (when
    asked for) the outputs it committed."""

    key: str
    label: str
    stage: str  # the stage's id in the spec
    point: dict[str, Any]
    state: str  # the scheduler's word where a backend has one, else the recorded state ("unknown": none)
    recorded: JobState | None  # the state the job's own record holds
    where: str  # executor and its id ("slurm 1234_5", "local 4242"), or a backend's words; "" if unknown
    log: Path | None  # the job's log, if there is one
    last_error: str | None = None  # a failed job's: the log line that says why
    outputs: dict[str, ArtifactVersion] | None = None  # output name -> committed version (None: none recorded)
    outputs_problem: str | None = None  # why the committed outputs could not be read
    progress: JobProgress | None = None  # a running job's latest progress (orchestrator.progress)

    @property
    def attempt(self) -> int | None:
        return self.recorded.attempt if self.recorded else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: everything the status table shows, and the rest of the job's state record."""
        rec = self.recorded
        return {
            "key": self.key,
            "label": self.label,
            "stage": self.stage,
            "point": self.point,
            "state": self.state,
            "recorded_state": rec.state if rec else None,
            "attempt": rec.attempt if rec else None,
            "updated_at": rec.updated_at if rec else None,
            "exit_code": rec.exit_code if rec else None,
            "executor": rec.executor if rec else None,
            "external_id": rec.external_id if rec else None,
            "message": rec.message if rec else None,
            "where": self.where or None,
            "log": None if self.log is None else str(self.log),
            "last_error": self.last_error,
            "outputs": None if self.outputs is None else {name: _output_dict(v) for name, v in sorted(self.outputs.items())},
            "outputs_problem": self.outputs_problem,
            "progress": None if self.progress is None else self.progress.model_dump(mode="json"),
        }


def _output_dict(version: ArtifactVersion) -> dict[str, Any]:
    return {"ref": str(version.ref), "type": version.type, "digest": version.digest, "size": version.size}


@dataclass
class StudyStatus:
    """A submitted study: its plan's jobs in plan order, with their states."""

    study: str
    root: Path
    submitted_at: str
    spec_path: str | None
    jobs: list[JobStatus]
    warning: str | None = None  # a backend's scheduler could not be asked
    progress: StudyProgress | None = None  # elapsed and ETA while jobs remain (orchestrator.progress_study)

    @property
    def counts(self) -> dict[str, int]:
        """Jobs per shown state, sorted by state."""
        return dict(sorted(Counter(job.state for job in self.jobs).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "root": str(self.root),
            "submitted_at": self.submitted_at,
            "spec_path": self.spec_path,
            "counts": self.counts,
            "warning": self.warning,
            "progress": None if self.progress is None else self.progress.to_dict(),
            "jobs": [job.to_dict() for job in self.jobs],
        }


def check_submitted(paths: StudyPaths) -> dict[str, Any]:
    """The study's submitted plan (``plan.json``); BadArgument if it was never submitted there."""
    if not paths.plan.exists():
        raise BadArgument(f"no study {paths.study!r} under {paths.root} (no {paths.plan}); submit it first, or pass --store")
    return read_plan(paths)


def job_states(paths: StudyPaths) -> list[tuple[dict[str, Any], JobState | None]]:
    """Every job of the study's submitted plan with its recorded state (None: it recorded none)."""
    return [(job, read_state(paths, job["key"])) for job in check_submitted(paths)["jobs"]]


def study_status(
    paths: StudyPaths,
    view: StatusView | None = None,
    states: list[tuple[dict[str, Any], JobState | None]] | None = None,
    store: ArtifactStore | None = None,
) -> StudyStatus:
    """The study's jobs as recorded, with the backends' word (``view``, from ``Executor.status``)
    where they have one; with ``store``, also each job's committed outputs, and a job that recorded
    no state but has them (a pulled study, say) is ``cached``."""
    plan = check_submitted(paths)
    view = view or StatusView()
    jobs = []
    if states is None:
        states = [(job, read_state(paths, job["key"])) for job in plan["jobs"]]
    for job, state in states:
        key = str(job["key"])
        outputs, problem = committed_outputs(store, key) if store is not None else (None, None)
        recorded = state.state if state else ("cached" if outputs is not None else "unknown")
        recorded_where = f"{state.executor} {state.external_id}" if state and state.external_id else ""
        shown, where = view.rows.get(key, (recorded, recorded_where))
        log = paths.job(key).log
        status = JobStatus(key, str(job["label"]), str(job["stage_id"]), dict(job.get("point") or {}), shown, state, where, None)
        if log.exists():
            status.log = log
            if shown in FAILED_STATES:
                status.last_error = last_error_line(log) or "no error line in its log"
        status.outputs, status.outputs_problem = outputs, problem
        jobs.append(status)
    job_states_now = {j.key: j.state for j in jobs}
    progress = study_progress(paths.dir / "jobs", [job for job, _ in states], job_states_now, plan["submitted_at"])
    for status in jobs:
        status.progress = progress.jobs.get(status.key)
    return StudyStatus(paths.study, paths.root, str(plan["submitted_at"]), plan.get("spec_path"), jobs, view.warning, progress)


def committed_outputs(store: ArtifactStore, job_key: str) -> tuple[dict[str, ArtifactVersion] | None, str | None]:
    """(the versions job ``job_key`` committed, None if it recorded none; why they cannot be read)."""
    try:
        refs = store.job_outputs(job_key)
        return (None if refs is None else {name: store.get(ref) for name, ref in refs.items()}), None
    except ArtifactError as e:
        return None, str(e)


@dataclass
class StudyOutputs:
    """What a study's jobs committed, in plan order: (job of plan.json, output name -> version)."""

    study: str
    root: Path
    jobs: list[tuple[dict[str, Any], dict[str, ArtifactVersion]]] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # job key -> why its outputs cannot be read

    def versions(self) -> list[ArtifactVersion]:
        return [v for _, outputs in self.jobs for v in outputs.values()]

    def to_dict(self) -> dict[str, Any]:
        artifacts = [
            {**version_dict(v, files=False), "output": name, "job_key": job["key"], "job_label": job["label"]}
            for job, outputs in self.jobs
            for name, v in outputs.items()
        ]
        waiting = [{"key": job["key"], "label": job["label"]} for job, outputs in self.jobs if not outputs]
        return {"study": self.study, "root": str(self.root), "artifacts": artifacts, "jobs_without_outputs": waiting,
                "problems": self.problems}  # fmt: skip


def study_outputs(paths: StudyPaths, store: ArtifactStore | None) -> StudyOutputs:
    """Every job of the submitted study with the versions it committed (none without a store)."""
    out = StudyOutputs(paths.study, paths.root)
    for job in check_submitted(paths)["jobs"]:
        outputs, problem = committed_outputs(store, job["key"]) if store is not None else (None, None)
        out.jobs.append((job, outputs or {}))
        if problem:
            out.problems[str(job["key"])] = problem
    return out


def last_error_line(log: Path, tail_bytes: int = 65536) -> str | None:
    """The line of a job log that says why its last attempt failed: the exception a traceback ends
    with, else the runner's own FAILED/error line; None without either."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    fallback = None
    for line in reversed(lines):
        text = line.strip()
        if EXCEPTION_LINE.match(text):
            return text
        if fallback is None and ("FAILED" in text or text.startswith("error:") or "slurmstepd: error" in text):
            fallback = text
        if ": running stage " in text:  # the start of the last attempt
            break
    return fallback
