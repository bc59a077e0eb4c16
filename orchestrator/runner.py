"""The one entry point every executor calls: ``python -m orchestrator run-job JOB.json``.

A run of a job, wherever it runs (a local process, a SLURM task, a W&B agent), goes through
these steps, and the order is what makes lineage trustworthy:

1. Take the job key's run lock (``StudyPaths.run_lock``: ``lockf``, so it works across
   processes, studies sharing a store, executors and NFS clients, and the kernel frees it when its
   holder dies). A second run of the same key waits here, saying who holds it.
2. Under the lock, check the committed result again (``lineage.LineageCheck``): if outputs are
   present and were built from the input versions the upstream jobs record now, the loser of a
   race reuses the winner's result and runs nothing.
3. Resolve every input to the exact version its upstream job recorded, materialised read-only
   and verified against its digests (``store.materialize``: copies, never the blobs themselves).
4. Run the stage in a child process (``stageproc``) writing into a staging folder of this attempt
   alone; a folder left by an attempt that died is removed here, since the lock proves it dead.
5. Once the stage process and everything it started have exited, check that it did not write to
   its inputs, then hash and commit each output, and record the job: its outputs and the input
   versions it consumed. That record is the commit point for caching.
6. A failed attempt (exit 1) runs again from step 3, in a fresh staging folder and under the same
   lock, as often as ``resources.retries`` allows, after a backoff (``_attempts``); both
   executors get this by calling ``run_job``.

Exit codes: 0 done (or already done), 1 failed, 3 interrupted after a checkpoint (the executor may
requeue it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactRef, ArtifactStore, Producer, open_store
from orchestrator.artifacts.locking import LockTimeout, file_lock, holder
from orchestrator.errors import OrchestratorError
from orchestrator.exitcodes import EXIT_TIMEOUT
from orchestrator.lineage import NOT_RUN, LineageCheck
from orchestrator.paths import StudyPaths, run_lock_path
from orchestrator.progress import ProgressRecorder, progress_path
from orchestrator.provenance import code_provenance, stage_provenance, version_provenance
from orchestrator.ranks import stage_processes
from orchestrator.records import JobRecord, read_job_record, read_state, write_state
from orchestrator.stage import ResolvedInput, StageDef, load_registry
from orchestrator.stageproc import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    FORWARDED,
    Context,
    JobStopped,
    RunSignals,
    on_stop_signals,
    run_stage_process,
)
from orchestrator.stageproc import install_stop_handlers as _install_stop_handlers
from orchestrator.tracking import TrackingRun, open_run

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_ABORTED",
    "EXIT_TIMEOUT",
    "Context",
    "JobStopped",
    "run_job",
    "_install_stop_handlers",
]


def run_job_command(record: Path, *, force: bool = False, code: Mapping[str, Any] | None = None) -> int:
    """``run-job RECORD [--force]`` without parsing a command line, with ``main``'s exit codes and
    error messages: what the local executor's job processes call (building the whole parser
    costs ~3 ms, a tenth of a trivial job). ``code``: see ``run_job``."""
    from orchestrator.guard import guarded

    return guarded(lambda: run_job(record, force=force, code=code, final=True))


def run_job(
    record_path: Path,
    force: bool = False,
    code: Mapping[str, Any] | None = None,
    *,
    final: bool = False,
    stops: RunSignals | None = None,
) -> int:
    """Run the job described by ``record_path``; return the process exit code.

    A job whose result is current (outputs committed from the input versions its upstream jobs
    record now) is not run again unless ``force`` is set, so a requeued or duplicated job is
    harmless. ``code``: this checkout's ``code_provenance()`` when the caller has it already (the
    local executor computes it once for many jobs); else computed here. Stop signals are answered
    phase by phase (``stageproc.RunSignals``). ``final``: the calling process ends with the job
    (``run-job``); once the outcome is decided, stop signals are held until it exits, so that a
    late one cannot turn a decided outcome into death by signal with nothing reported. ``stops``:
    the caller's, to learn which stop signals arrived.
    """
    record = read_job_record(record_path)
    paths = StudyPaths(record.root, record.study)
    store = open_store(record.root)
    stops = stops or RunSignals(record.label)
    with on_stop_signals(stops.handle):
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # a stop the caller held arrives now
            with run_lock(paths.run_lock(record.key), record.label):
                if not force:
                    problem = LineageCheck(store).problem(record.key, record.inputs)
                    if problem is None:
                        print(f"{record.label}: outputs already committed; nothing to do", flush=True)
                        return EXIT_OK
                    if problem != NOT_RUN:
                        print(f"{record.label}: runs again: {problem}", flush=True)
                return _attempts(record, paths, store, code, stops)
        except JobStopped as e:
            print(f"{record.label}: stopped by {e}; nothing was committed", flush=True)
            return EXIT_INTERRUPTED
        finally:
            if final:
                signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)


def _attempts(
    record: JobRecord, paths: StudyPaths, store: ArtifactStore, code: Mapping[str, Any] | None, stops: RunSignals
) -> int:
    """The job's attempts, under its run lock, each in a fresh staging folder (the checkpoint
    folder persists): one, and as many again as ``resources.retries`` allows while attempts fail
    (exit 1: the stage raised or was killed, or the commit failed), after ``retry_backoff_s``,
    doubled before each further retry. An attempt stopped by a signal (exit 3 or 4, a time limit
    included) is never retried, nor is an error raised before the stage ran (a stage version that
    does not match the plan, a missing or damaged input): running again cannot change it."""
    retries, attempt = record.resources.retries, 1
    while True:
        failure: list[str] = []
        with attempt_dir(paths, record.key) as staging:
            rc = _attempt(record, paths, store, staging, code, stops, failure=failure)
        if rc != EXIT_FAILED or attempt > retries:
            return rc
        stops.finishing = False  # from here on a stop signal raises JobStopped (RunSignals.handle): nothing runs
        if stops.received:  # one came while the attempt ended: it may be why it failed; stop, do not retry
            raise JobStopped(stops.received[-1])
        wait = retry_wait(record.resources.retry_backoff_s, attempt)
        why = failure[-1] if failure else "exit 1"
        print(
            f"{record.label}: attempt {attempt + 1} of {retries + 1} in {wait:g} s (attempt {attempt} failed: {why})",
            flush=True,
        )
        attempt += 1
        _note_attempt(paths, record, attempt)
        time.sleep(wait)  # a stop signal ends it (and the job, as interrupted) at once


def retry_wait(backoff_s: float, failed: int) -> float:
    """Seconds to wait after attempt number ``failed`` failed: ``backoff_s``, doubled for each
    attempt before it (Snakemake's restart-times, with a growing pause)."""
    return backoff_s * 2 ** (failed - 1)


def _note_attempt(paths: StudyPaths, record: JobRecord, attempt: int) -> None:
    """Record in the job's state which attempt runs, for ``status``: only where an executor
    records the job as running (a bare ``run-job`` must not leave "running" behind). The
    executor carries it into the job's final state. A state that cannot be written costs the
    job nothing."""
    try:
        state = read_state(paths, record.key)
        if state is not None and state.state == "running":
            fields = state.model_dump(exclude={"state", "updated_at", "attempt"})
            write_state(paths, record.key, "running", **fields, attempt=attempt)
    except (OSError, ValueError) as e:
        print(f"{record.label}: warning: could not record attempt {attempt} in its state: {e}", flush=True)


def _attempt(
    record: JobRecord,
    paths: StudyPaths,
    store: ArtifactStore,
    staging: Path,
    code: Mapping[str, Any] | None,
    stops: RunSignals,
    *,
    failure: list[str] | None = None,
) -> int:
    """One attempt, under the job's run lock, writing into ``staging`` (this attempt's alone).
    ``failure``: where a failed attempt (exit 1) appends why, for the retry's log line."""
    failure = [] if failure is None else failure
    progress = ProgressRecorder(progress_path(paths.job(record.key).dir), record.label, record.stage_id)
    progress.start()  # this attempt's progress.json, over the last one's
    stage_def = _stage_def(record)
    res = record.resources
    processes = stage_processes(res.processes, res.gpu_count())
    inputs = resolve_inputs(store, record)
    checkpoint = paths.job(record.key).checkpoint
    checkpoint.mkdir(parents=True, exist_ok=True)
    code = code_provenance() if code is None else code
    lineage = stage_provenance(record, store, (ArtifactRef(i.name, i.version) for i in _flatten(inputs)), code)
    print(f"{record.label}: running stage {record.stage} (key {record.key[:12]}, seed {record.seed})", flush=True)

    def context(run: TrackingRun, stop: threading.Event) -> Context:  # (stageproc sets rank and world_size)
        return Context(record.seed, record.label, checkpoint, staging, run, stop, lineage, gpus=res.gpu_count())

    def tracking() -> TrackingRun:
        run = open_run(record, paths)
        for item in _flatten(inputs):
            run.use_input(store.get(ArtifactRef(item.name, item.version)), item.path)
        return run

    params = stage_def.params.model_validate(record.params)
    result, run = run_stage_process(stage_def, params, inputs, context, tracking, stops, processes=processes, progress=progress)
    if result.exit_code != EXIT_OK or result.metadata is None:
        progress.end(ok=False)
        run.finish(ok=False)
        if result.exit_code == EXIT_FAILED:
            failure.append(result.message or "traceback above")
            print(f"{record.label}: FAILED ({result.message or 'traceback above'})", flush=True)
        return result.exit_code if result.exit_code in (EXIT_INTERRUPTED, EXIT_ABORTED) else EXIT_FAILED
    try:
        _check_inputs_untouched(store, record, inputs)
        refs = commit_outputs(store, record, stage_def, staging, result.metadata, inputs, code)
        for ref in refs.values() if run.mirrors_files else ():
            run.log_output(store.get(ref), store.materialize(ref))
    except Exception as e:  # noqa: BLE001 - a failed commit is a failed job, with its reason in the log
        progress.end(ok=False)
        run.finish(ok=False)
        failure.append(f"committing its outputs failed: {e}")
        print(f"{record.label}: FAILED while committing its outputs: {e}", flush=True)
        return EXIT_FAILED
    progress.end(ok=True)  # (the stage history that ETAs come from: how long this attempt took)
    run.finish(ok=True)
    print(f"{record.label}: committed " + ", ".join(str(r) for r in refs.values()), flush=True)
    return EXIT_OK


@contextlib.contextmanager
def run_lock(path: Path, label: str) -> Iterator[None]:
    """Hold the run lock of one job key; if another run holds it, say who and wait for it."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path, timeout_s=0.0))
        except LockTimeout:
            print(f"{label}: another run of this job ({holder(path)}) holds {path}; waiting for it to finish", flush=True)
            stack.enter_context(file_lock(path, timeout_s=None))
            print(f"{label}: the other run has finished", flush=True)
        yield


@contextlib.contextmanager
def attempt_dir(paths: StudyPaths, key: str) -> Iterator[Path]:
    """A fresh staging folder for this attempt (caller holds the run lock), removed afterwards
    whatever happens. Folders of earlier attempts of this key are removed first: the lock proves
    that nobody is writing to them any more."""
    folder = paths.staging(key)
    _remove_attempts(folder)
    attempt = paths.attempt(key, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    attempt.mkdir(parents=True)
    try:
        yield attempt
    finally:
        shutil.rmtree(attempt, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # if empty


def _remove_attempts(folder: Path) -> list[str]:
    """Remove every attempt's folder under a key's staging ``folder`` (the caller holds the key's
    run lock, which proves them dead); return their names."""
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    for name in names:
        shutil.rmtree(folder / name, ignore_errors=True)
    return names


def clean_stale_attempts(root: Path) -> list[str]:
    """Remove the staging folders of attempts that died (``fsck``): under each job key's run
    lock, taken without waiting, so a key that is running right now is left alone. Returns
    ``<key>/<attempt>`` of each folder removed."""
    removed: list[str] = []
    staging = root / "staging"
    for folder in sorted(staging.iterdir()) if staging.is_dir() else []:
        if not folder.is_dir():
            continue
        try:
            with file_lock(run_lock_path(root, folder.name), timeout_s=0.0):
                removed += [f"{folder.name}/{name}" for name in _remove_attempts(folder)]
                with contextlib.suppress(OSError):
                    folder.rmdir()
        except LockTimeout:
            continue  # running now
    return removed


def _check_inputs_untouched(store: ArtifactStore, record: JobRecord, inputs: Mapping[str, Any]) -> None:
    """A stage that wrote to its inputs computed from bytes its lineage does not name: fail it."""
    for item in _flatten(inputs):
        changed = store.modified_view_files(ArtifactRef(item.name, item.version))
        if changed:
            raise OrchestratorError(
                f"stage {record.stage!r} wrote to its input {item.ref} ({', '.join(changed[:5])}); inputs are read-only, "
                "write to ctx.output_dir() instead. Nothing was committed"
            )


def _stage_def(record: JobRecord) -> StageDef:
    stage_def = load_registry(record.stage_package).get(record.stage)
    if stage_def is None:
        raise OrchestratorError(f"stage {record.stage!r} is not in package {record.stage_package!r}")
    if stage_def.version != record.stage_version:
        raise OrchestratorError(
            f"stage {record.stage!r} is at version {stage_def.version} but the job was planned with "
            f"version {record.stage_version}; submit the study again to re-plan it"
        )
    return stage_def


def resolve_inputs(store: ArtifactStore, record: JobRecord) -> dict[str, ResolvedInput | list[ResolvedInput]]:
    """Each input as the exact artifact version its upstream job recorded."""
    resolved: dict[str, ResolvedInput | list[ResolvedInput]] = {}
    for binding in record.inputs:
        items = []
        for up in binding.upstream:
            outputs = store.job_outputs(up.job_key)
            if outputs is None or up.output not in outputs:
                raise OrchestratorError(
                    f"input {binding.name!r} of {record.label}: upstream job {up.job_key[:12]} has no committed "
                    f"output {up.output!r}; submit the study so that it runs first"
                )
            version = store.get(outputs[up.output])
            items.append(
                ResolvedInput(
                    name=version.ref.name,
                    version=version.ref.version,
                    type=version.type,
                    path=store.materialize(version.ref),
                    metadata=dict(version.metadata),
                    point=dict(up.point),
                    job_key=up.job_key,
                )
            )
        resolved[binding.name] = items if binding.many else items[0]
    return resolved


def commit_outputs(
    store: ArtifactStore,
    record: JobRecord,
    stage_def: StageDef,
    staging: Path,
    metadata: Mapping[str, Mapping[str, Any]],
    inputs: Mapping[str, ResolvedInput | list[ResolvedInput]],
    code: Mapping[str, Any] | None = None,
) -> dict[str, ArtifactRef]:
    """Log every declared output, then record them under the job key (the commit point for caching)."""
    unknown = set(metadata) - set(stage_def.outputs)
    if unknown:
        raise OrchestratorError(f"stage {record.stage!r} returned metadata for undeclared outputs {sorted(unknown)}")
    producer = Producer(
        job_key=record.key,
        study=record.study,
        stage=record.stage,
        job_label=record.label,
        inputs=tuple(ArtifactRef(i.name, i.version) for i in _flatten(inputs)),
        provenance=version_provenance(record, code),
    )
    refs: dict[str, ArtifactRef] = {}
    for out in record.outputs:
        out_dir = staging / out.name
        if not out_dir.is_dir() or not any(out_dir.iterdir()):
            raise OrchestratorError(f"stage {record.stage!r} wrote nothing to output {out.name!r} (ctx.output_dir({out.name!r}))")
        version = store.log(
            out.artifact,
            out.type,
            out_dir,
            metadata=dict(metadata.get(out.name, {})),
            aliases=[f"study-{record.study}", f"job-{record.key[:16]}"],
            producer=producer,
            move=True,  # staging is the store's own filesystem and discarded after: rename, not copy
        )
        refs[out.name] = version.ref
    consumed = {name: [ArtifactRef(i.name, i.version) for i in (v if isinstance(v, list) else [v])] for name, v in inputs.items()}
    store.record_job(record.key, refs, inputs=consumed)
    return refs


def _flatten(inputs: Mapping[str, ResolvedInput | list[ResolvedInput]]) -> list[ResolvedInput]:
    out: list[ResolvedInput] = []
    for value in inputs.values():
        out += value if isinstance(value, list) else [value]
    return out
