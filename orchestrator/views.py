"""Text views for the CLI: plan, submit summary, status, artifacts, lineage. Pure string builders."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestrator.artifacts import ArtifactNotFound, ArtifactRef, ArtifactStore, ArtifactVersion
from orchestrator.errors import BadArgument
from orchestrator.executors.base import StatusView, SubmitReport
from orchestrator.lineage import went_stale
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.records import JobState, read_plan, read_state

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


def job_states(paths: StudyPaths) -> list[tuple[dict[str, object], JobState | None]]:
    """Every job of the study's submitted plan with its recorded state (None: it recorded none)."""
    if not paths.plan.exists():
        raise BadArgument(
            f"no study {paths.study!r} under {paths.root} (no {paths.plan}); submit it first, or pass --store"
        )
    return [(job, read_state(paths, job["key"])) for job in read_plan(paths)["jobs"]]


def status_table(
    paths: StudyPaths, view: StatusView | None = None, states: list[tuple[dict[str, object], JobState | None]] | None = None
) -> str:
    """One row per job: its state and where it runs, as recorded or as its executor's scheduler
    tells (``view``: the backends' ``Executor.status``), and its log; then the last error line of
    each failed job."""
    view = view or StatusView()
    rows, counts, errors = [], Counter[str](), []
    for job, state in job_states(paths) if states is None else states:
        key = str(job["key"])
        recorded: str = state.state if state else "unknown"
        where = f"{state.executor} {state.external_id}" if state and state.external_id else ""
        name, where = view.rows.get(key, (recorded, where))
        counts[name] += 1
        log = paths.job(key).log
        shown = attempt_text(name, state.attempt) if state and name == state.state else name
        rows.append([job["label"], shown, where or "-", log if log.exists() else "-"])
        if name in ("failed", "timeout"):
            errors.append(f"  {job['label']}: {last_error_line(log) or 'no error line in its log'}")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    submitted = read_plan(paths)["submitted_at"]
    text = f"study {paths.study} (submitted {submitted}): {summary}\n" + table(["job", "state", "where", "log"], rows)
    return text + ("\n\nlast error of each failed job:\n" + "\n".join(errors) if errors else "")


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure|Warning)\b.*$")


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


def attempt_text(state: str, attempt: int | None) -> str:
    """A state with its attempts where there were several (resources.retries): "running (attempt 2)",
    "failed (3 attempts)"."""
    if not attempt or attempt < 2:
        return state
    return f"{state} (attempt {attempt})" if state == "running" else f"{state} ({attempt} attempts)"


def artifact_table(paths: StudyPaths, store: ArtifactStore) -> str:
    if not paths.plan.exists():
        raise BadArgument(f"no study {paths.study!r} under {paths.root}; submit it first, or pass --store")
    rows = []
    for job in read_plan(paths)["jobs"]:
        outputs = store.job_outputs(job["key"]) or {}
        for ref in outputs.values():
            version = store.get(ref)
            rows.append([str(ref), version.type, _size(version.size), len(version.files), job["label"]])
        if not outputs:
            rows.append(["-", "-", "-", "-", f"{job['label']} (no outputs yet)"])
    return table(["artifact", "type", "size", "files", "produced by"], rows)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def named_version(store: ArtifactStore, ref_text: str) -> ArtifactVersion:
    """The version a user named on the command line (``NAME`` means its latest)."""
    try:
        return store.get(ref_text if ":" in ref_text else f"{ref_text}:latest")
    except ArtifactNotFound as e:
        raise BadArgument(str(e)) from None


def lineage_tree(store: ArtifactStore, ref_text: str) -> str:
    """The artifact, the job that produced it, and recursively that job's inputs."""
    version = named_version(store, ref_text)
    lines: list[str] = []
    _lineage(store, version.ref, "", lines, set())
    return "\n".join(lines)


def version_details(store: ArtifactStore, ref_text: str) -> str:
    """One version: what it is, the job, spec and code that produced it, and its inputs."""
    version = named_version(store, ref_text)
    lines = [
        f"{version.ref} [{version.type}]: {len(version.files)} files, {_size(version.size)}, created {version.created_at}",
        f"  digest    {version.digest}",
        f"  aliases   {', '.join(version.aliases) or '-'}",
    ]
    if version.metadata:
        lines.append(f"  metadata  {json.dumps(dict(version.metadata), sort_keys=True)}")
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
            lines.append(f"  {ref} (no longer in the store)")
    return "\n".join(lines)


def _lineage(store: ArtifactStore, ref: ArtifactRef, indent: str, lines: list[str], seen: set[ArtifactRef]) -> None:
    version = store.get(ref)
    producer = version.producer
    by = f" <- {producer.job_label} (job {producer.job_key[:12]})" if producer else ""
    lines.append(f"{indent}{ref} [{version.type}]{by}")
    if ref in seen or producer is None:
        return
    seen.add(ref)
    for parent in producer.inputs:
        _lineage(store, parent, indent + "  ", lines, seen)
