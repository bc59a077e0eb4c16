"""``python -m orchestrator sync STUDY``: upload a study's offline W&B runs, producers first.

Every job tracked with W&B keeps its runs under ``studies/<study>/jobs/<key>/wandb/`` and a
``wandb-run.json`` next to them (see ``orchestrator.tracking.wandb``). ``sync`` reads the submitted
plan, finds each job's runs that are not uploaded yet (offline runs, and online runs whose upload
did not finish) and runs ``wandb sync DIR...`` once per level of the job DAG: a job's producers are
uploaded, with their artifacts, before the job itself. Then it declares the inputs that offline
runs could not declare (wandb 0.31 has no ``use_artifact`` offline) through W&B's public API, so
that W&B's lineage graph shows the study's DAG.

A run counts as synced when ``wandb sync`` leaves its ``run-<id>.wandb.synced`` marker (wandb 0.31
exits 0 even when it is not logged in, so the exit code alone is not trusted).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import BadArgument, OrchestratorError
from orchestrator.fsutil import atomic_write_json
from orchestrator.paths import StudyPaths
from orchestrator.records import read_plan, read_state
from orchestrator.tracking.wandb import (
    INSTALL_HINT,
    KEY_VAR,
    import_wandb,
    load_api_key,
    marker_path,
    read_marker,
    redact,
)

UNFINISHED = {"pending", "queued", "running"}


@dataclass
class RunDir:
    """One W&B run directory of one job, to upload."""

    job_key: str
    label: str
    path: Path
    online: bool  # an online run whose upload did not finish (wandb sync skips those by default)
    name: str  # as recorded in wandb-run.json: relative to the job's directory


@dataclass
class SyncReport:
    commands: list[list[str]] = field(default_factory=list)
    planned: list[RunDir] = field(default_factory=list)  # in upload order
    synced: list[RunDir] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (job label, why)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (job label or run, why)
    linked: int = 0
    link_failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.link_failed


def wandb_executable() -> str | None:
    """The ``wandb`` command: the one on PATH, else the one installed next to this Python; None if neither."""
    found = shutil.which("wandb")
    if found:
        return found
    sibling = Path(sys.executable).parent / "wandb"
    return str(sibling) if sibling.exists() else None


def wandb_command() -> list[str]:
    """The ``wandb`` CLI: ``wandb_executable()``, else ``python -m wandb``."""
    found = wandb_executable()
    if found:
        return [found]
    if importlib.util.find_spec("wandb") is None:
        raise OrchestratorError(f"sync needs the wandb CLI; install it with: {INSTALL_HINT}")
    return [sys.executable, "-m", "wandb"]


def _plan_jobs(paths: StudyPaths) -> list[dict[str, Any]]:
    if not paths.plan.exists():
        raise BadArgument(
            f"no study {paths.study!r} under {paths.root} (no {paths.plan}); submit it first, or pass --store"
        )
    return list(read_plan(paths)["jobs"])


def levels(jobs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Each job's depth in the DAG (0 = no upstream job); the plan lists jobs in topological order."""
    depth: dict[str, int] = {}
    for job in jobs:
        depth[job["key"]] = 1 + max((depth[d] for d in job["deps"] if d in depth), default=-1)
    return depth


def _is_synced(run_dir: Path) -> bool:
    files = list(run_dir.glob("*.wandb"))
    return bool(files) and all(f.with_suffix(".wandb.synced").exists() for f in files)


def _job_runs(paths: StudyPaths, job: dict[str, Any], marker: dict[str, Any]) -> tuple[list[RunDir], list[str]]:
    """The job's run directories still to upload, and why the others are not."""
    job_dir = paths.job(job["key"]).dir
    entries = {r["dir"]: r for r in marker.get("runs", [])}
    for d in sorted((job_dir / "wandb").glob("offline-run-*")):  # also runs the marker missed
        entries.setdefault(str(d.relative_to(job_dir)), {"dir": str(d.relative_to(job_dir)), "mode": "offline"})
    todo: list[RunDir] = []
    notes: list[str] = []
    for name, entry in sorted(entries.items()):
        path = job_dir / name
        if not list(path.glob("*.wandb")):
            notes.append(f"{name}: no .wandb file")
        elif entry.get("uploaded"):
            notes.append(f"{name}: uploaded online")
        elif name in marker.get("synced", []) or _is_synced(path):
            notes.append(f"{name}: already synced")
        else:
            todo.append(RunDir(job["key"], job["label"], path, entry.get("mode") == "online", name))
    return todo, notes


def collect(paths: StudyPaths, report: SyncReport) -> list[list[RunDir]]:
    """The run directories to upload, grouped by DAG level (producers' levels first)."""
    jobs = _plan_jobs(paths)
    depth = levels(jobs)
    by_level: dict[int, list[RunDir]] = {}
    for job in jobs:
        marker = read_marker(marker_path(paths, job["key"]))
        if marker is None:
            report.skipped.append((job["label"], "no W&B run (cached, not run yet, or tracked locally)"))
            continue
        state = read_state(paths, job["key"])
        if state is not None and state.state in UNFINISHED:
            report.skipped.append((job["label"], f"still {state.state}; sync again when it has ended"))
            continue
        todo, notes = _job_runs(paths, job, marker)
        if not todo:
            report.skipped.append((job["label"], "; ".join(notes) or "no W&B run directory"))
        by_level.setdefault(depth[job["key"]], []).extend(todo)
    return [by_level[k] for k in sorted(by_level) if by_level[k]]


def _mark_synced(paths: StudyPaths, run: RunDir) -> None:
    path = marker_path(paths, run.job_key)
    marker = read_marker(path)
    if marker is not None and run.name not in marker.setdefault("synced", []):
        marker["synced"].append(run.name)
        atomic_write_json(path, marker)


def sync_study(
    paths: StudyPaths,
    *,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    runner: Callable[..., subprocess.CompletedProcess[Any]] = subprocess.run,
    api_factory: Callable[[], Any] | None = None,
) -> SyncReport:
    """Upload the study's W&B runs that are not uploaded yet, one ``wandb sync`` per DAG level,
    then declare the inputs offline runs could not declare. ``dry_run`` only prints the commands."""
    report = SyncReport()
    batches = collect(paths, report)
    env = dict(os.environ)
    has_key = load_api_key(Path.cwd(), paths.root, env=env)  # the key travels in env, never in argv
    total = sum(len(b) for b in batches)
    echo(
        f"study {paths.study}: {total} W&B runs to upload in {len(batches)} steps (producers first)"
        + (" [dry run]" if dry_run else "")
    )
    for batch in batches:
        cmd = [
            *wandb_command(),
            "sync",
            *(["--include-online"] if any(r.online for r in batch) else []),
            *(str(r.path) for r in batch),
        ]
        report.commands.append(cmd)
        report.planned.extend(batch)
        echo("$ " + shlex.join(cmd))
        if dry_run:
            continue
        try:
            rc = runner(cmd, env=env, check=False).returncode
        except OSError as e:
            rc = None
            echo(f"cannot run wandb: {e}")
        for run in batch:
            if _is_synced(run.path):
                report.synced.append(run)
                _mark_synced(paths, run)
            else:
                why = f"wandb sync exited {rc}" if rc else "wandb sync did not mark it synced"
                report.failed.append((run.label, f"{run.path}: {why}" + ("" if has_key else f" (no {KEY_VAR})")))
    if not dry_run:
        link_inputs(paths, report, echo, api_factory)
    _print(report, echo, dry_run)
    return report


def _print(report: SyncReport, echo: Callable[[str], None], dry_run: bool) -> None:
    if dry_run:
        for run in report.planned:
            echo(f"would sync {run.label}: {run.path}")
    for run in report.synced:
        echo(f"synced   {run.label}: {run.name}")
    for label, why in report.skipped:
        echo(f"skipped  {label}: {why}")
    for label, why in report.failed:
        echo(f"FAILED   {label}: {why}")
    for label, why in report.link_failed:
        echo(f"LINEAGE  {label}: {why}")
    if not dry_run:
        echo(
            f"{len(report.synced)} synced, {len(report.skipped)} skipped, {len(report.failed)} failed; "
            f"{report.linked} inputs declared in W&B, {len(report.link_failed)} not yet (run sync again)"
        )


# ------------------------------------------------------------------------------------- lineage
def _pending_links(paths: StudyPaths, report: SyncReport) -> list[tuple[Path, dict[str, Any]]]:
    """Jobs whose runs are all uploaded but whose inputs are not declared in W&B yet."""
    failed = {label for label, _ in report.failed}
    out = []
    for job in _plan_jobs(paths):
        path = marker_path(paths, job["key"])
        marker = read_marker(path)
        if marker is None or job["label"] in failed or not any(not i.get("linked") for i in marker.get("inputs", [])):
            continue
        runs = marker.get("runs", [])
        if runs and all(r.get("uploaded") or r["dir"] in marker.get("synced", []) for r in runs):
            out.append((path, marker))
    return out


def link_inputs(
    paths: StudyPaths, report: SyncReport, echo: Callable[[str], None], api_factory: Callable[[], Any] | None = None
) -> None:
    """Declare each uploaded run's undeclared inputs with the public API's ``Run.use_artifact``
    (the input as ``<name>:job-<upstream key16>``, the alias its producer logged it with)."""
    pending = _pending_links(paths, report)
    if not pending:
        return
    try:
        api = (api_factory or _default_api(paths))()
    except Exception as e:  # noqa: BLE001 - no credentials or no network: try again on the next sync
        for _, marker in pending:
            report.link_failed.append((marker["label"], redact(f"W&B API unavailable: {e}")))
        return
    for path, marker in pending:
        _link_job(api, marker, report)
        atomic_write_json(path, marker)


def _default_api(paths: StudyPaths) -> Callable[[], Any]:
    def make() -> Any:
        wandb = import_wandb()
        env = dict(os.environ)
        load_api_key(Path.cwd(), paths.root, env=env)
        return wandb.Api(timeout=60, api_key=env.get(KEY_VAR) or None)

    return make


def _link_job(api: Any, marker: dict[str, Any], report: SyncReport) -> None:
    label = marker["label"]
    try:
        entity = marker.get("entity") or api.default_entity
        prefix = "/".join(p for p in (entity, marker.get("project") or "uncategorized") if p)
        run = api.run(f"{prefix}/{marker['run_id']}")
    except Exception as e:  # noqa: BLE001
        report.link_failed.append((label, redact(f"run {marker['run_id']} not found in W&B: {e}")))
        return
    for entry in marker.get("inputs", []):
        if entry.get("linked"):
            continue
        name = f"{prefix}/{entry['artifact']}:{entry['alias']}"
        try:
            run.use_artifact(api.artifact(name, type=entry["type"]))
        except Exception as e:  # noqa: BLE001 - e.g. its producer's run failed to sync
            report.link_failed.append((label, redact(f"input {name}: {e}")))
            continue
        entry["linked"] = True
        report.linked += 1
