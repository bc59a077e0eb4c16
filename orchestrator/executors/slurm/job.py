"""The job side of a SLURM array task: ``python -m orchestrator run-job --list JOBS.json --index N``
(what the batch script runs) picks its job record from the submission's job list, logs into the
job's own log file, records its state as the local executor does, and turns SLURM's time-limit
signal into an exit code that tells the batch script whether to requeue.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from orchestrator.artifacts import ArtifactError
from orchestrator.errors import OrchestratorError
from orchestrator.exitcodes import EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TIMEOUT
from orchestrator.paths import StudyPaths
from orchestrator.records import JobRecord, State, read_job_record, recorded_attempt, write_job_record, write_state
from orchestrator.runner import run_job
from orchestrator.stageproc import FORWARDED, RunSignals


def run_listed_job(list_path: Path, index: int, force: bool = False, max_requeues: int = 3) -> int:
    """Run the job at array ``index`` of a job list (JSON: array index -> job record; a SLURM array task), logging into the
    job's own log file and recording its state, as the local executor does for its jobs.

    At SLURM's time-limit signal (USR2) the exit code tells the batch script whether to requeue:
    3 only when a checkpoint was saved (or the stage had not started) and the job has been requeued
    fewer than ``max_requeues`` times (``SLURM_RESTART_COUNT``); otherwise the job is recorded as
    ``timeout``, with what to change, and exits with a code that does not requeue."""
    records = json.loads(list_path.read_text(encoding="utf-8"))
    if isinstance(records, list):  # by position (lists written before per-task dependencies)
        records = dict(enumerate(records))
    entry = records.get(str(index), records.get(index))  # the record itself, or the path of its job.json
    if entry is None:
        raise OrchestratorError(f"{list_path} has no job at array index {index} (it has {', '.join(map(str, records))})")
    record = JobRecord.model_validate(entry) if isinstance(entry, dict) else read_job_record(Path(entry))
    paths = StudyPaths(record.root, record.study)
    record_path = write_job_record(paths, record)  # next to the job's log, as for local jobs
    log = paths.job(record.key).log
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    external = slurm_job_id()
    # From "running" on, a stop must end in a recorded outcome, never in death by signal with
    # "running" left on record: stops wait (blocked) until run_job's handler is in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    write_state(paths, record.key, "running", executor="slurm", external_id=external)
    stops = RunSignals(record.label)
    try:  # final: scancel signals every process of the job, and the batch shell passes the signal on
        rc = run_job(record_path, force, final=True, stops=stops)  # again; late ones must not keep the outcome unrecorded
    except (OrchestratorError, ArtifactError) as e:
        print(f"error: {e}", flush=True)
        rc = EXIT_FAILED
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    state, rc, message = task_outcome(rc, "SIGUSR2" in stops.received, restarts, max_requeues, record.stage_id)
    if message:
        print(f"{record.label}: {message}", flush=True)
    attempt = recorded_attempt(paths, record.key) if record.resources.retries else None
    write_state(paths, record.key, state, exit_code=rc, executor="slurm", external_id=external, message=message, attempt=attempt)
    return rc


def task_outcome(rc: int, time_limit: bool, restarts: int, max_requeues: int, stage_id: str) -> tuple[State, int, str | None]:
    """(state, exit code, message) of a SLURM task that exited ``rc``; ``time_limit``: SLURM's
    time-limit signal arrived. Exit 3 makes the batch script requeue the job, so it is kept only
    where a requeue resumes and requeues are left."""
    raise_limit = f"raise executor.resources.{stage_id}.time_min"
    if time_limit and rc == EXIT_ABORTED:
        return (
            "timeout",
            EXIT_ABORTED,
            f"stopped at its time limit: stage {stage_id!r} does not checkpoint, so a requeue would start it over; {raise_limit}",
        )
    if time_limit and rc == EXIT_INTERRUPTED and restarts >= max_requeues:
        return (
            "timeout",
            EXIT_TIMEOUT,
            f"checkpointed at its time limit after {restarts} requeue(s), the most "
            f"max_requeues ({max_requeues}) allows; {raise_limit} (or max_requeues), then submit again to resume",
        )
    if time_limit and rc == EXIT_INTERRUPTED:
        return (
            "interrupted",
            rc,
            f"checkpointed at its time limit; SLURM requeues it (requeue {restarts + 1} of {max_requeues}) and it resumes",
        )
    states: dict[int, State] = {EXIT_OK: "succeeded", EXIT_INTERRUPTED: "interrupted", EXIT_ABORTED: "interrupted"}
    return states.get(rc, "failed"), rc, None


def slurm_job_id() -> str | None:
    """This job's id as squeue and sacct print it: ``123`` or, in an array, ``122_4``."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
