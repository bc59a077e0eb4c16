"""The one entry point every executor calls: ``python -m orchestrator run-job JOB.json``.

It opens a tracking run, resolves every input by lineage (the exact version the upstream job
recorded), calls the stage, commits each output as an artifact version with its lineage and
provenance, and records the job's outputs under its key. Exit codes: 0 done (or already done),
1 failed, 3 interrupted after a checkpoint (the executor may requeue it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactRef, ArtifactStore, LocalStore, Producer
from orchestrator.errors import OrchestratorError
from orchestrator.paths import StudyPaths
from orchestrator.records import JobRecord, read_job_record, write_job_record, write_state
from orchestrator.stage import ResolvedInput, StageDef, StageInterrupted, load_registry
from orchestrator.tracking import TrackingRun, open_run

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
PACKAGES = ("torch", "transformers", "datasets", "accelerate", "tokenizers", "numpy", "pydantic", "wandb")


@dataclass
class Context:
    """The StageContext handed to a stage (see orchestrator.stage)."""

    seed: int
    job_label: str
    checkpoint_dir: Path
    staging: Path
    run: TrackingRun
    stop_requested: threading.Event = field(default_factory=threading.Event)

    def output_dir(self, name: str) -> Path:
        path = self.staging / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log(metrics, step)


def open_store(root: Path) -> ArtifactStore:
    return LocalStore(root / "artifacts")


def run_listed_job(list_path: Path, index: int, force: bool = False) -> int:
    """Run entry ``index`` of a JSON list of job records (a SLURM array task), logging into the
    job's own log file and recording its state, as the local executor does for its jobs."""
    records = json.loads(list_path.read_text(encoding="utf-8"))
    if not 0 <= index < len(records):
        raise OrchestratorError(f"{list_path} has {len(records)} jobs; there is no index {index}")
    entry = records[index]  # the record itself, or the path of its job.json
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
    write_state(paths, record.key, "running", executor="slurm", external_id=external)
    try:
        rc = run_job(record_path, force)
    except OrchestratorError as e:
        print(f"error: {e}", flush=True)
        rc = EXIT_FAILED
    state = {EXIT_OK: "succeeded", EXIT_INTERRUPTED: "interrupted"}.get(rc, "failed")
    write_state(paths, record.key, state, exit_code=rc, executor="slurm", external_id=external)  # type: ignore[arg-type]
    return rc


def slurm_job_id() -> str | None:
    """This job's id as squeue and sacct print it: ``123`` or, in an array, ``122_4``."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def run_job(record_path: Path, force: bool = False, code: Mapping[str, Any] | None = None) -> int:
    """Run the job described by ``record_path``; return the process exit code.

    A job whose outputs are already committed is not run again unless ``force`` is set, so that a
    requeued or duplicated job is harmless. ``code``: this checkout's ``code_provenance()`` when the
    caller has it already (the local executor computes it once for many jobs); else computed here.
    """
    record = read_job_record(record_path)
    paths = StudyPaths(record.root, record.study)
    store = open_store(record.root)
    if not force and store.job_outputs(record.key) is not None:
        print(f"{record.label}: outputs already committed; nothing to do")
        return EXIT_OK
    stage_def = _stage_def(record)
    inputs = resolve_inputs(store, record)
    run = open_run(record, paths)
    for item in _flatten(inputs):
        run.use_input(store.get(ArtifactRef(item.name, item.version)), item.path)
    staging = paths.staging(record.key)
    shutil.rmtree(staging, ignore_errors=True)
    ctx = Context(record.seed, record.label, paths.job(record.key).checkpoint, staging, run)
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    _install_stop_handlers(ctx.stop_requested, graceful=stage_def.checkpoints)
    try:
        print(f"{record.label}: running stage {record.stage} (key {record.key[:12]}, seed {record.seed})", flush=True)
        metadata = stage_def.fn(stage_def.params.model_validate(record.params), inputs, ctx) or {}
        refs = commit_outputs(store, record, stage_def, staging, metadata, inputs, code)
        for ref in refs.values():
            run.log_output(store.get(ref), store.materialize(ref))
    except StageInterrupted as e:
        run.finish(ok=False)
        print(f"{record.label}: interrupted after a checkpoint ({e}); resubmit to resume", flush=True)
        return EXIT_INTERRUPTED
    except JobStopped as e:
        run.finish(ok=False)
        print(f"{record.label}: stopped by {e}; nothing was committed", flush=True)
        return EXIT_INTERRUPTED
    except BaseException:
        run.finish(ok=False)
        traceback.print_exc()
        print(f"{record.label}: FAILED (traceback above)", flush=True)
        return EXIT_FAILED
    run.finish(ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"{record.label}: committed " + ", ".join(str(r) for r in refs.values()), flush=True)
    return EXIT_OK


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
        provenance=provenance(record, code),
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
    store.record_job(record.key, refs)
    return refs


def _flatten(inputs: Mapping[str, ResolvedInput | list[ResolvedInput]]) -> list[ResolvedInput]:
    out: list[ResolvedInput] = []
    for value in inputs.values():
        out += value if isinstance(value, list) else [value]
    return out


def provenance(record: JobRecord, code: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce an artifact: spec, job, code and package versions, seed
    (``code``: ``code_provenance()``, computed here unless given)."""
    code = code_provenance() if code is None else code
    return {"spec_hash": record.spec_hash, "job_key": record.key, "seed": record.seed, **code}


def code_provenance() -> dict[str, Any]:
    """The part of provenance that is the same for every job run by one interpreter on one
    checkout: git commit (+dirty), Python, host and package versions.

    It costs ~10 ms (two git subprocesses, 8 package metadata files), a third of a trivial job,
    so the local executor computes it in the submitting process and hands it to its job
    processes (``run_job(..., code=...)``); a SLURM task, on its own node, computes its own.
    """
    return {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "packages": {p: v for p in PACKAGES if (v := _version(p))},
    }


def git_commit() -> str | None:
    """The commit of the checkout holding the stage code, with ``+dirty`` for uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    """The installed version of ``package`` (None if it is not installed).

    Reads the ``Version:`` header itself: ``importlib.metadata.version`` runs the email parser
    over the whole metadata file, long description included (8 ms for our 8 packages, not 3).
    """
    try:
        dist = importlib_metadata.distribution(package)
    except importlib_metadata.PackageNotFoundError:
        return None
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    for line in text.splitlines():
        if not line:  # the headers end at the first empty line
            break
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "version":
            return value.strip()
    return dist.version


class JobStopped(BaseException):
    """Raised in the stage's thread by a stop signal: unwinds the stage without committing anything."""


def _install_stop_handlers(event: threading.Event, graceful: bool) -> None:
    """SIGTERM/SIGUSR2 stop the job. A stage that checkpoints is asked to (``event``) and gets one
    signal's grace; any other stage, or a second signal, is stopped at once."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if event.is_set() or not graceful:
            raise JobStopped(name)
        event.set()
        print(f"received {signal.Signals(signum).name}: asking the stage to checkpoint and stop", file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)
