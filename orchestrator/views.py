"""Text views for the CLI: plan, submit summary, status, artifacts, lineage. Pure string builders;
``status`` and ``artifacts`` render the data ``overview`` builds (which ``--json`` prints as is)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactError, ArtifactNotFound, ArtifactStore, ArtifactVersion, DamagedRecord
from orchestrator.artifacts.describe import NO_LONGER_STORED, render_tree, upstream_tree
from orchestrator.errors import BadArgument
from orchestrator.executors.base import StatusView, SubmitReport
from orchestrator.lineage import went_stale
from orchestrator.overview import (
    JobStatus,
    StudyOutputs,
    StudyStatus,
    job_states,
    last_error_line,
    study_outputs,
    study_status,
)
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.progress import progress_cell
from orchestrator.records import JobState, read_state

__all__ = ["job_states", "last_error_line"]  # re-exported: where they were before overview.py

TAIL_LINES = 15


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_table(plan: Plan, cached: set[str], verbose: bool = False, reasons: Mapping[str, str] | None = None) -> str:
    """The job DAG: each job's key, whether it is cached or runs (and, given ``reasons``, why it
    runs again: "stale: input ... is v2, was built from v1"), and what it depends on."""
    labels = {job.key: job.label for job in plan.jobs}
    rows = []
    for job in plan.jobs:
        deps = ", ".join(labels[d] for d in job.deps) or "-"
        reason = (reasons or {}).get(job.key, "")
        state = "cached" if job.key in cached else (f"run ({reason})" if went_stale(reason) else "run")
        rows.append([job.label, job.key[:12], state, deps])
        if verbose:
            rows.append(["", "", "params", _short(job.params)])
    head = f"study {plan.study.name}: {len(plan.jobs)} jobs, {len(cached)} cached, {len(plan.jobs) - len(cached)} to run"
    return head + "\n" + table(["job", "key", "state", "depends on"], rows)


def _short(value: object, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_summary(plan: Plan, report: SubmitReport, paths: StudyPaths) -> str:
    parts = [f"{len(report.cached)} cached"]
    parts += [f"{len(report.submitted)} queued"] if report.submitted else [f"{len(report.succeeded)} succeeded"]
    parts += [f"{len(report.failed)} failed"] if report.failed else []
    parts += [f"{len(report.skipped)} skipped"] if report.skipped else []
    parts += [f"{len(report.cancelled)} cancelled"] if report.cancelled else []
    lines = [f"study {plan.study.name}: " + ", ".join(parts)]
    for key, log in report.failed.items():
        job, state = plan.by_key[key], read_state(paths, key)
        if state is not None and state.state == "timeout":
            advice = f"; give it longer with executor.resources.{job.stage_id}.time_min"
            lines += [f"TIMEOUT {job.label}: log {log}{advice}", *_tail(log)]
        else:
            lines += [f"FAILED {job.label}: log {log}", *_tail(log)]
    if report.ok and not report.submitted:
        lines.append(f"artifacts: python -m orchestrator artifacts {plan.study.name} --store {paths.root}")
    return "\n".join(lines)


def _tail(path: Path) -> list[str]:
    try:
        text = open(path, encoding="utf-8", errors="replace").read()  # noqa: SIM115
    except OSError:
        return []
    return [f"  | {line}" for line in text.splitlines()[-TAIL_LINES:]]


# ---------------------------------------------------------------------------------------- status
@dataclass(frozen=True)
class Column:
    """A column of the status table: its header and what it shows of a job."""

    header: str
    cell: Callable[[JobStatus], object]


def _state_cell(job: JobStatus) -> str:
    return attempt_text(job.state, job.attempt) if job.recorded and job.state == job.recorded.state else job.state


# The status table's columns; -v adds VERBOSE_STATUS_COLUMNS (each after the column it names).
STATUS_COLUMNS = [
    Column("job", lambda j: j.label),
    Column("state", _state_cell),
    Column("progress", lambda j: progress_cell(j.progress, time.time()) or "-"),  # a running job's (ctx.progress)
    Column("where", lambda j: j.where or "-"),
    Column("log", lambda j: j.log or "-"),
]
VERBOSE_STATUS_COLUMNS = {
    "job": Column("key", lambda j: j.key),
    "where": Column("updated", lambda j: j.recorded.updated_at if j.recorded else "-"),
}


def status_columns(verbose: bool = False) -> list[Column]:
    columns = []
    for column in STATUS_COLUMNS:
        columns.append(column)
        if verbose and column.header in VERBOSE_STATUS_COLUMNS:
            columns.append(VERBOSE_STATUS_COLUMNS[column.header])
    return columns


def status_table(
    paths: StudyPaths,
    view: StatusView | None = None,
    states: list[tuple[dict[str, Any], JobState | None]] | None = None,
    *,
    verbose: bool = False,
    quiet: bool = False,
) -> str:
    """One row per job: its state and where it runs, as recorded or as its executor's scheduler
    tells (``view``: the backends' ``Executor.status``), and its log; then the last error line of
    each failed job."""
    return render_status(study_status(paths, view, states), verbose=verbose, quiet=quiet)


def render_status(status: StudyStatus, *, verbose: bool = False, quiet: bool = False) -> str:
    """``status_table`` of data built already; ``quiet``: without the summary line, ``verbose``:
    with each job's full key and the time of its last state change."""
    columns = status_columns(verbose)
    rows = [[column.cell(job) for column in columns] for job in status.jobs]
    summary = ", ".join(f"{n} {s}" for s, n in status.counts.items())
    eta = f"; {status.progress.text()}" if status.progress and status.progress.text() else ""  # elapsed, ETA
    head = "" if quiet else f"study {status.study} (submitted {status.submitted_at}): {summary}{eta}\n"
    errors = [f"  {job.label}: {job.last_error}" for job in status.jobs if job.last_error]
    text = head + table([c.header for c in columns], rows)
    return text + ("\n\nlast error of each failed job:\n" + "\n".join(errors) if errors else "")


def attempt_text(state: str, attempt: int | None) -> str:
    """A state with its attempts where there were several (resources.retries): "running (attempt 2)",
    "failed (3 attempts)"."""
    if not attempt or attempt < 2:
        return state
    return f"{state} (attempt {attempt})" if state == "running" else f"{state} ({attempt} attempts)"


# ------------------------------------------------------------------------------------- artifacts
def artifact_table(paths: StudyPaths, store: ArtifactStore | None, *, verbose: bool = False, quiet: bool = False) -> str:
    """What the study's jobs committed: one row per version (``quiet``: only its ``name:vN``, one
    per line, for scripts; ``verbose``: also its digest, creation time and aliases)."""
    return render_artifacts(study_outputs(paths, store), verbose=verbose, quiet=quiet)


def render_artifacts(outputs: StudyOutputs, *, verbose: bool = False, quiet: bool = False) -> str:
    """``artifact_table`` of data built already."""
    if quiet:
        return "\n".join(str(v.ref) for v in outputs.versions())
    rows: list[list[object]] = []
    for job, versions in outputs.jobs:
        for v in versions.values():
            extra = [v.digest, v.created_at, ", ".join(v.aliases)] if verbose else []
            rows.append([str(v.ref), v.type, _size(v.size), len(v.files), job["label"], *extra])
        if not versions:
            problem = outputs.problems.get(str(job["key"]))
            why = f"outputs cannot be read: {problem}" if problem else "no outputs yet"
            rows.append(["-", "-", "-", "-", f"{job['label']} ({why})", *(["-"] * 3 if verbose else [])])
    headers = ["artifact", "type", "size", "files", "produced by", *(["digest", "created", "aliases"] if verbose else [])]
    return table(headers, rows)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def named_version(store: ArtifactStore, ref_text: str) -> ArtifactVersion:
    """The version a user named on the command line (``NAME`` means its latest); BadArgument
    naming what exists if there is no such version."""
    try:
        return store.get(ref_text if ":" in ref_text else f"{ref_text}:latest")
    except DamagedRecord:
        raise
    except ArtifactError as e:  # no such name, version or alias, or not a reference at all
        raise BadArgument(str(e)) from None


def lineage_tree(store: ArtifactStore, ref_text: str, *, verbose: bool = False) -> str:
    """The artifact, the job that produced it, and recursively that job's inputs (``verbose``:
    full job keys)."""
    return render_tree(upstream_tree(store, named_version(store, ref_text)), full_keys=verbose)


def version_details(store: ArtifactStore, ref_text: str, *, verbose: bool = False) -> str:
    """One version: what it is, the job, spec and code that produced it, and its inputs
    (``verbose``: and each of its files with size and digest)."""
    version = named_version(store, ref_text)
    lines = [
        f"{version.ref} [{version.type}]: {len(version.files)} files, {_size(version.size)}, created {version.created_at}",
        f"  digest    {version.digest}",
        f"  aliases   {', '.join(version.aliases) or '-'}",
    ]
    if version.metadata:
        lines.append(f"  metadata  {json.dumps(dict(version.metadata), sort_keys=True)}")
    if verbose:
        lines += [f"  file      {f.path}  {_size(f.size)}  sha256 {f.sha256}" for f in version.files]
    producer = version.producer
    if producer is None:
        return "\n".join([*lines, "  produced outside any study (no producing job recorded)"])
    prov = producer.provenance
    lines += [
        f"produced by {producer.job_label} (stage {producer.stage}, version {prov.get('stage_version', '?')}; "
        f"study {producer.study}, job {producer.job_key})",
        f"  params    {json.dumps(prov['params'], sort_keys=True) if 'params' in prov else '(not recorded)'}",
        f"  seed      {prov.get('seed', '?')}",
        f"  spec hash {prov.get('spec_hash', '?')}",
        f"  git commit {prov.get('git_commit') or '(not a git checkout)'}",
        f"  python    {prov.get('python', '?')} on {prov.get('host', '?')}",
        "  packages  " + (", ".join(f"{k} {v}" for k, v in sorted(dict(prov.get("packages") or {}).items())) or "-"),
        "inputs:" if producer.inputs else "inputs: none",
    ]
    for ref in producer.inputs:
        try:
            parent = store.get(ref)
            by = f" <- {parent.producer.job_label}" if parent.producer else ""
            lines.append(f"  {ref} [{parent.type}]{by}")
        except ArtifactNotFound:
            lines.append(f"  {ref} ({NO_LONGER_STORED})")
    return "\n".join(lines)
