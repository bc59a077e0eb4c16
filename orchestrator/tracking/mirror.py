"""``python -m orchestrator track STUDY``: mirror a study's committed results to W&B, running nothing.

A study run with ``tracking.backend=local`` (or whose W&B runs were lost) has its results in the
store only. ``track`` gives each job of the submitted plan (``plan.json``) that has a committed
job record the W&B run it would have had if it had been tracked live, in plan (topological)
order, through the same ``WandbRun`` the runner uses:

- the same run id (``run_id(study, key)``), group, job type, name, config and tags, and files
  under the job's ``wandb/`` folder with its ``wandb-run.json``, so that ``sync`` uploads offline
  runs producers first and declares their inputs;
- its inputs declared (``use_input``) with the exact versions its job record says it consumed, its
  metrics replayed from ``metrics.jsonl`` (steps and wall times kept), its outputs logged
  (``log_output``) from the store's read-only verified views, then finished.

No stage runs and no record changes: versions, job records, job logs, states and metrics are only
read. Getting a version's files to W&B does write to the store's ``materialized/`` folder (the
verified views the runner itself makes), so ``track`` needs a writable store. A job whose marker
says its run finished with the same outputs logged in the same project is skipped (``--force``
mirrors it again, into the same run id). After the jobs, a run of its own logs the study index
(``tracking/index.py``) that ``pull`` reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from orchestrator import console
from orchestrator.artifacts import ArtifactNotFound, ArtifactRef, JobCommit, LocalStore
from orchestrator.errors import BadArgument, OrchestratorError
from orchestrator.fsutil import atomic_write_json
from orchestrator.lineage import NOT_RUN
from orchestrator.paths import StudyPaths
from orchestrator.records import JobRecord, read_job_record, read_plan, read_state, record_dict
from orchestrator.spec import Study, TrackingSpec
from orchestrator.sync import UNFINISHED
from orchestrator.tracking.index import (
    INDEX_FILE,
    INDEX_KEY,
    INDEX_TYPE,
    build_index,
    index_aliases,
    index_artifact_name,
    index_dir,
)
from orchestrator.tracking.wandb import WandbRun
from orchestrator.tracking.wandb_files import import_wandb, marker_path, read_marker, requested_mode


@dataclass
class TrackReport:
    """What ``track`` did (or, with ``dry_run``, would do), job by job (labels)."""

    mirrored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # already in W&B, or still running
    not_committed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    index: str | None = None  # what happened to the study index

    @property
    def ok(self) -> bool:
        return not self.failed


# ------------------------------------------------------------------------------------ settings
def tracking_for(plan: Mapping[str, Any], project: str | None, entity: str | None, mode: str | None) -> TrackingSpec:
    """The W&B settings to mirror with: the options, else the submitted spec's ``tracking``."""
    try:
        spec = TrackingSpec.model_validate((plan.get("spec") or {}).get("tracking") or {})
    except ValueError:
        spec = TrackingSpec()
    project = project or spec.project
    if not project:
        raise BadArgument(
            f"study {plan.get('study')!r} names no W&B project (its spec has no tracking.project); pass --project NAME"
        )
    chosen = requested_mode(mode or spec.mode)
    if chosen == "disabled":
        raise BadArgument("WANDB_MODE=disabled: nothing would reach W&B; pass --mode offline or --mode online")
    return spec.model_copy(update={"backend": "wandb", "project": project, "entity": entity or spec.entity, "mode": chosen})


class JobRecords:
    """Each job's run record: its ``job.json`` (what it ran with), else the one its executor would
    have written, rebuilt from the plan's spec (a job this study found cached). Root and tracking
    are this store's and the mirror's."""

    def __init__(self, paths: StudyPaths, plan: Mapping[str, Any], tracking: TrackingSpec) -> None:
        self.paths, self.plan, self.tracking = paths, plan, tracking
        self._rebuilt: dict[str, JobRecord] | None = None

    def get(self, key: str) -> JobRecord:
        path = self.paths.job(key).record
        if path.exists():
            try:
                record = read_job_record(path)
            except (OSError, ValueError) as e:
                raise OrchestratorError(f"cannot read {path}: {e}") from None
        else:
            record = self._from_plan(key)
        return record.model_copy(update={"root": self.paths.root, "tracking": self.tracking})

    def _from_plan(self, key: str) -> JobRecord:
        if self._rebuilt is None:
            try:
                self._rebuilt = self._rebuild()
            except (ImportError, ValueError) as e:  # the stage package, or a spec this version does not read
                raise OrchestratorError(f"no job.json, and the plan cannot be rebuilt from the submitted spec: {e}") from None
        if key not in self._rebuilt:
            raise OrchestratorError("no job.json, and the plan rebuilt from the submitted spec has no such job (stages changed?)")
        return self._rebuilt[key]

    def _rebuild(self) -> dict[str, JobRecord]:
        from orchestrator.plan import build_plan
        from orchestrator.stage import load_registry

        study = Study.model_validate(self.plan["spec"])
        plan = build_plan(study, load_registry(study.stage_package), max_jobs=None)
        spec_hash, spec_path = self.plan.get("spec_hash") or study.spec_hash(), self.plan.get("spec_path")
        return {
            job.key: JobRecord.model_validate(
                record_dict(job, plan, self.paths.root, spec_hash, Path(spec_path) if spec_path else None)
            )
            for job in plan.jobs
        }


# ----------------------------------------------------------------------------------------- runs
class MirrorRun(WandbRun):
    """A job's W&B run rebuilt after the fact: metrics go to W&B only (they are in the job's
    ``metrics.jsonl`` already, which is read, never appended to)."""

    def _settings(self) -> Any:
        settings = super()._settings()
        if not console.verbose():
            settings.silent = True  # track prints a line per job; wandb's own banners with -v
        return settings

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        data = dict(metrics)
        self._call("log", lambda run: run.log(data, step=step))

    def replay(self, metrics: Mapping[str, float], step: int | None, at: float | None) -> None:
        """One row of ``metrics.jsonl``, at its step and with its wall time."""
        self.log({**metrics, **({"_timestamp": at} if at is not None else {})}, step)


class IndexRun(MirrorRun):
    """The run that logs the study index (job type ``orchestrator-index``)."""

    def __init__(self, paths: StudyPaths, tracking: TrackingSpec, spec_hash: str, *, wandb: ModuleType | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        record = JobRecord(
            key=INDEX_KEY, label=INDEX_KEY, study=paths.study, stage_id=INDEX_TYPE, stage=INDEX_TYPE, stage_version="",
            stage_package="", params={}, seed=0, point={}, inputs=[], outputs=[], root=paths.root, spec_hash=spec_hash,
            tracking=tracking,
        )
        super().__init__(record, paths, wandb=wandb, echo=echo)

    def _config(self) -> dict[str, Any]:
        return {"study": self.record.study, "spec_hash": self.record.spec_hash, "job_key": INDEX_KEY}

    def log_index(self, path: Path, digest: str, counts: Mapping[str, int]) -> bool:
        """Log ``path`` (index.json) as the study's index artifact; whether it was logged."""
        name, study = index_artifact_name(self.record.study), self.record.study
        entry: dict[str, Any] = {"artifact": name, "type": INDEX_TYPE, "digest": digest, "aliases": index_aliases(study),
                                 "logged": False, "wandb_digest": None}
        self.state["outputs"].append(entry)
        art = self.wandb.Artifact(name=name, type=INDEX_TYPE, metadata={"orchestrator": {"study": study, **counts}})
        art.add_file(str(path), name=INDEX_FILE)  # copied to W&B's staging area: the file is rewritten by the next track
        aliases = entry["aliases"]
        if self.run is not None and self._call(f"log_artifact {name}", lambda run: run.log_artifact(art, aliases=aliases)):
            entry.update(logged=True, wandb_digest=getattr(art, "digest", None))
        self._save()
        return bool(entry["logged"])


def metric_rows(path: Path) -> Iterator[tuple[dict[str, float], int | None, float | None]]:
    """(metrics, step, wall time) of each row of a ``metrics.jsonl`` (LocalRun's format; a value
    written as null was not finite and comes back as NaN); a line that is not a row is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # e.g. the last line of a job killed mid-write
        if not isinstance(row, dict):
            continue
        step, at = row.pop("step", None), row.pop("time", None)
        metrics = {k: math.nan if v is None else float(v) for k, v in row.items() if v is None or isinstance(v, int | float)}
        yield metrics, step if isinstance(step, int) else None, at if isinstance(at, int | float) else None


# ---------------------------------------------------------------------------------------- jobs
def input_refs(record: JobRecord, commit: JobCommit, store: LocalStore) -> list[ArtifactRef]:
    """The versions the job consumed, in the order the runner declared them (its bindings' order)."""
    if commit.inputs is None:  # a record from before inputs were recorded: its outputs' lineage
        first = next(iter(commit.outputs.values()), None)
        producer = store.get(first).producer if first is not None else None
        return list(producer.inputs) if producer is not None and producer.job_key == record.key else []
    names = [b.name for b in record.inputs] + sorted(set(commit.inputs) - {b.name for b in record.inputs})
    return [ref for name in names for ref in commit.inputs.get(name, ())]


def output_refs(record: JobRecord, commit: JobCommit) -> list[ArtifactRef]:
    """The job's committed outputs, in the order the runner logged them (the record's)."""
    names = [o.name for o in record.outputs if o.name in commit.outputs]
    return [commit.outputs[n] for n in names + sorted(set(commit.outputs) - set(names))]


def already_mirrored(marker: Mapping[str, Any] | None, commit: JobCommit, tracking: TrackingSpec) -> bool:
    """Whether the job's marker says its run finished with exactly these outputs logged, in this project."""
    if not marker or not marker.get("finished") or marker.get("project") != tracking.project:
        return False
    if tracking.entity and marker.get("entity") not in (None, tracking.entity):
        return False
    logged = {o.get("ref") for o in marker.get("outputs", []) if o.get("logged")}
    return logged == {str(r) for r in commit.outputs.values()}


def mirror_job(record: JobRecord, commit: JobCommit, paths: StudyPaths, store: LocalStore, *,
               wandb: ModuleType, echo: Callable[[str], None]) -> str | None:
    """Give one committed job its W&B run; None if every output was logged, else what went wrong."""
    run = MirrorRun(record, paths, wandb=wandb, echo=echo)
    run.state["mirrored"] = True  # made by track, not by the job itself
    try:
        for ref in input_refs(record, commit, store):
            run.use_input(store.get(ref), store.materialize(ref))
        rows = 0
        for metrics, step, at in metric_rows(paths.job(record.key).metrics):
            run.replay(metrics, step, at)
            rows += 1
        run.state["metric_rows"] = rows
        for ref in output_refs(record, commit):
            run.log_output(store.get(ref), store.materialize(ref))
    except Exception as e:  # noqa: BLE001 - e.g. a corrupt blob (CorruptArtifact): this job fails, the others go on
        run.finish(ok=False)
        return f"{type(e).__name__}: {e}"
    started = run.run is not None
    run.finish(ok=True)
    if not started:
        return "; ".join(run.state["errors"]) or "no W&B run could be started"
    missing = [o["ref"] for o in run.state["outputs"] if not o["logged"]]
    return f"not logged: {', '.join(missing)} ({'; '.join(run.state['errors'])})" if missing else None


# --------------------------------------------------------------------------------------- study
def track_study(
    paths: StudyPaths,
    *,
    project: str | None = None,
    entity: str | None = None,
    mode: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    echo: Callable[[str], None] = print,
    wandb: ModuleType | None = None,
) -> TrackReport:
    """Mirror every committed job of the study's plan to W&B, in plan order, then log the study
    index; ``dry_run`` only says what would be mirrored. See the module docstring."""
    if not paths.plan.exists():
        raise BadArgument(f"no study {paths.study!r} under {paths.root} (no {paths.plan}); submit it first, or pass --store")
    plan = read_plan(paths)
    tracking = tracking_for(plan, project, entity, mode)
    try:
        store = LocalStore(paths.store, create=False)
    except ArtifactNotFound:
        raise BadArgument(f"no artifact store at {paths.store}; pass the storage root with --store DIR") from None
    records, report, in_wandb = JobRecords(paths, plan, tracking), TrackReport(), []
    wandb = None if dry_run else (wandb or import_wandb())
    say = (lambda m: None) if console.quiet() else echo
    where = f"W&B project {tracking.entity + '/' if tracking.entity else ''}{tracking.project} ({tracking.mode})"
    say(f"study {paths.study}: mirroring committed jobs to {where}" + (" [dry run]" if dry_run else ""))
    for entry in plan["jobs"]:
        key, label = str(entry["key"]), str(entry["label"])
        bucket, note, commit = triage(paths, store, key, tracking, force=force)
        if bucket == "in W&B":
            in_wandb.append(key)
        if commit is None or bucket != "to mirror":
            (report.not_committed if bucket == "not committed" else report.skipped).append((label, note))
            continue
        why: str | None = None
        if wandb is not None:
            say(f"mirroring {label}")
            try:
                why = mirror_job(records.get(key), commit, paths, store, wandb=wandb, echo=_job_echo(label))
            except OrchestratorError as e:
                why = str(e)
        if why:
            report.failed.append((label, why))
        else:
            report.mirrored.append(label)
            in_wandb.append(key)
    report.index = _track_index(paths, store, plan, tracking, in_wandb, report, force=force, dry_run=dry_run, wandb=wandb)
    print_report(report, echo, dry_run, offline=tracking.mode == "offline", study=paths.study)
    return report


def triage(
    paths: StudyPaths, store: LocalStore, key: str, tracking: TrackingSpec, *, force: bool
) -> tuple[str, str, JobCommit | None]:
    """Where one job of the plan stands: ("not committed" | "running" | "in W&B" | "to mirror", why, its commit)."""
    problem, state = store.job_problem(key), read_state(paths, key)
    if problem == NOT_RUN:
        return "not committed", f"no committed outputs (job {state.state})" if state else "not run yet", None
    if problem is not None:
        return "not committed", problem, None
    if state is not None and state.state in UNFINISHED:
        return "running", f"still {state.state}; track again when it has ended", None
    commit = store.job_record(key)
    if commit is not None and not force and already_mirrored(read_marker(marker_path(paths, key)), commit, tracking):
        return "in W&B", "already in W&B (its wandb-run.json); --force mirrors it again", commit
    return ("to mirror", "", commit) if commit is not None else ("not committed", "not run yet", None)


def _job_echo(label: str) -> Callable[[str], None]:
    """W&B's messages about one job's run: shown with ``-v`` (failures are in the report anyway)."""
    return lambda msg: print(f"{label}: {msg}", file=sys.stderr, flush=True) if console.verbose() else None


def _track_index(paths: StudyPaths, store: LocalStore, plan: Mapping[str, Any], tracking: TrackingSpec, keys: list[str],
                 report: TrackReport, *, force: bool, dry_run: bool, wandb: ModuleType | None) -> str:
    """Log the study index of the jobs now in W&B, unless a job failed or the same index is logged."""
    if report.failed:
        return "not logged: some jobs failed (track again)"
    if not keys:
        return "not logged: no job is in W&B"
    data = build_index(paths, store, keys)
    digest = _digest({k: v for k, v in data.items() if k != "created_at"})
    marker = read_marker(marker_path(paths, INDEX_KEY)) or {}
    logged = [o for o in marker.get("outputs", []) if o.get("logged") and o.get("digest") == digest]
    summary = f"{len(data['jobs'])} jobs, {len(data['versions'])} versions"
    if logged and marker.get("project") == tracking.project and not force:
        return f"unchanged ({summary}); already logged"
    if dry_run:
        return f"would be logged ({summary})"
    path = index_dir(paths) / INDEX_FILE
    atomic_write_json(path, data)
    run = IndexRun(paths, tracking, str(plan.get("spec_hash") or ""), wandb=wandb, echo=_job_echo(INDEX_KEY))
    ok = run.log_index(path, digest, {"jobs": len(data["jobs"]), "versions": len(data["versions"])})
    run.finish(ok=ok)
    if not ok:
        report.failed.append((INDEX_KEY, "; ".join(run.state["errors"]) or "not logged"))
        return "not logged"
    return f"logged as {index_artifact_name(paths.study)} ({summary})"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def print_report(report: TrackReport, echo: Callable[[str], None], dry_run: bool, *, offline: bool, study: str) -> None:
    """One line per job, then the totals."""
    for label in report.mirrored:
        echo(f"{'would mirror' if dry_run else 'mirrored'} {label}")
    for label, why in report.skipped:
        echo(f"skipped  {label}: {why}")
    for label, why in report.not_committed:
        echo(f"not committed {label}: {why}")
    for label, why in report.failed:
        echo(f"FAILED   {label}: {why}")
    echo(f"index: {report.index}")
    echo(
        f"{len(report.mirrored)} {'to mirror' if dry_run else 'mirrored'}, {len(report.skipped)} skipped, "
        f"{len(report.not_committed)} not committed, {len(report.failed)} failed"
    )
    if offline and report.mirrored and not dry_run:
        echo(f"the runs are offline: upload them with: python -m orchestrator sync {study}")
