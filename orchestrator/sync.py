"""``python -m orchestrator sync STUDY``: upload a study's offline W&B runs, producers first.

Every job tracked with W&B keeps its runs under ``studies/<study>/jobs/<key>/wandb/`` and a
``wandb-run.json`` next to them (see ``orchestrator.tracking.wandb``). ``sync`` reads the submitted
plan, finds each job's runs that are not uploaded yet (offline runs, and online runs whose upload
did not finish) and runs ``wandb sync DIR...`` once per level of the job DAG: a job's producers are
uploaded, with their artifacts, before the job itself. Then it declares the inputs that offline
runs could not declare (wandb 0.31 has no ``use_artifact`` offline) through W&B's public API, so
that W&B's lineage graph shows the study's DAG.

A run counts as synced when ``wandb sync`` leaves its ``run-<id>.wandb.synced`` marker (wandb 0.31
exits 0 even when it is not logged in, so the exit code alone is not trusted). Each ``wandb sync``
runs in a process group of its own and is bounded (``timeout_s``): past it the whole group is
stopped, and the runs it had not marked synced are reported as failed and retried by the next sync.
``sync --watch`` (``orchestrator.sync_watch``) uploads runs as their jobs end, with this machinery.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import BadArgument, OrchestratorError
from orchestrator.fsutil import atomic_write_json
from orchestrator.paths import StudyPaths
from orchestrator.procutil import kill_group
from orchestrator.records import read_plan, read_state
from orchestrator.tracking.index import with_index_job
from orchestrator.tracking.wandb_files import (
    INSTALL_HINT,
    KEY_VAR,
    all_uploaded,
    import_wandb,
    load_api_key,
    marker_path,
    read_marker,
    redact,
)

UNFINISHED = {"pending", "queued", "running"}
DEFAULT_TIMEOUT_S = 1800.0  # one `wandb sync` command (one DAG level); --timeout S
STOP_GRACE_S = 10.0  # after SIGTERM to a timed-out upload's process group, SIGKILL


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


def run_bounded(
    cmd: Sequence[str], env: dict[str, str], timeout_s: float, output: Path | None = None
) -> tuple[int | None, str | None]:
    """Run ``cmd`` in a process group of its own, its output appended to ``output`` (default: ours):
    (exit code, why it failed to run or to end). Past ``timeout_s``, or when this process is
    interrupted, the whole group gets SIGTERM, then SIGKILL (wandb-core, which wandb starts in a
    session of its own, ends with the process that started it)."""
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(output.open("ab")) if output is not None else None
            proc = subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    except OSError as e:
        return None, f"cannot run wandb: {e}"
    try:
        return proc.wait(timeout=timeout_s), None
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return proc.returncode, f"wandb sync timed out after {timeout_s:g} s; sync again"
    except BaseException:  # Ctrl-C or SIGTERM (sync --watch): no upload is left running behind
        stop_group(proc)
        raise


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``STOP_GRACE_S`` (and whatever is left of it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE_S)
    kill_group(proc.pid)
    proc.wait()


def plan_jobs(paths: StudyPaths) -> list[dict[str, Any]]:
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


def job_runs(paths: StudyPaths, job: dict[str, Any], marker: dict[str, Any]) -> tuple[list[RunDir], list[str]]:
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
    """The run directories to upload, grouped by DAG level (producers' levels first); the run that
    logged the study index (``track``) last, after every run whose artifacts it lists."""
    jobs = with_index_job(paths, plan_jobs(paths))
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
        todo, notes = job_runs(paths, job, marker)
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


def sync_env(paths: StudyPaths) -> tuple[dict[str, str], bool]:
    """The environment ``wandb sync`` runs in (the API key travels in it, never in argv), and whether it has a key."""
    env = dict(os.environ)
    return env, load_api_key(Path.cwd(), paths.root, env=env)


def upload_batch(
    paths: StudyPaths,
    batch: Sequence[RunDir],
    report: SyncReport,
    *,
    env: dict[str, str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    output: Path | None = None,
) -> None:
    """One bounded ``wandb sync`` of ``batch`` (its output appended to ``output``, default ours);
    each run goes to ``report.synced`` (and the job's marker) if wandb marked it synced, else to
    ``report.failed``."""
    online = ["--include-online"] if any(r.online for r in batch) else []
    cmd = [*wandb_command(), "sync", *online, *(str(r.path) for r in batch)]
    report.commands.append(cmd)
    report.planned.extend(batch)
    echo("$ " + shlex.join(cmd))
    if dry_run:
        return
    rc, problem = run_bounded(cmd, env, timeout_s, output)
    why = problem or (f"wandb sync exited {rc}" if rc else "wandb sync did not mark it synced")
    why += f" (its output: {output})" if output is not None else ""
    for run in batch:
        if _is_synced(run.path):
            report.synced.append(run)
            _mark_synced(paths, run)
        else:
            report.failed.append((run.label, f"{run.path}: {why}" + ("" if env.get(KEY_VAR) else f" (no {KEY_VAR})")))


def sync_study(
    paths: StudyPaths,
    *,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    api_factory: Callable[[], Any] | None = None,
) -> SyncReport:
    """Upload the study's W&B runs that are not uploaded yet, one ``wandb sync`` per DAG level,
    then declare the inputs offline runs could not declare. ``dry_run`` only prints the commands."""
    report = SyncReport()
    batches = collect(paths, report)
    env, _ = sync_env(paths)
    total = sum(len(b) for b in batches)
    echo(
        f"study {paths.study}: {total} W&B runs to upload in {len(batches)} steps (producers first)"
        + (" [dry run]" if dry_run else "")
    )
    for batch in batches:
        upload_batch(paths, batch, report, env=env, timeout_s=timeout_s, dry_run=dry_run, echo=echo)
    if not dry_run:
        link_inputs(paths, report, echo, api_factory)
    print_report(report, echo, dry_run)
    return report


def print_report(report: SyncReport, echo: Callable[[str], None], dry_run: bool) -> None:
    """What was synced, skipped or failed, one line each, and the totals."""
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
def _pending_links(paths: StudyPaths, report: SyncReport, keys: Iterable[str]) -> list[tuple[Path, dict[str, Any]]]:
    """Jobs whose runs are all uploaded but whose inputs are not declared in W&B yet."""
    failed = {label for label, _ in report.failed}
    out = []
    for key in keys:
        path = marker_path(paths, key)
        marker = read_marker(path)
        if marker is None or marker.get("label") in failed or not any(not i.get("linked") for i in marker.get("inputs", [])):
            continue
        if marker.get("runs") and all_uploaded(marker):
            out.append((path, marker))
    return out


def link_inputs(
    paths: StudyPaths,
    report: SyncReport,
    echo: Callable[[str], None],
    api_factory: Callable[[], Any] | None = None,
    keys: Iterable[str] | None = None,
) -> None:
    """Declare each uploaded run's undeclared inputs with the public API's ``Run.use_artifact``
    (the input as ``<name>:job-<upstream key16>``, the alias its producer logged it with); of the
    jobs ``keys`` (default: the whole plan)."""
    pending = _pending_links(paths, report, [j["key"] for j in plan_jobs(paths)] if keys is None else keys)
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
