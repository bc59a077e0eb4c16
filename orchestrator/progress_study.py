"""A study's progress as a whole: how many jobs are done, running, failed and queued, and when it
should end, estimated from the stage history in the study's own records.

The history is every attempt that succeeded, in any submit of the study: its stage id and how long
it took, from ``progress.json`` in each job's folder (``orchestrator.progress``). A job still to run
is expected to take the median of its stage's history; a running one, what its own progress says is
left (done/total at its rate), else that median less what it has run. The study's ETA is the longer
of the remaining work spread over the slots (jobs at once) and the longest chain of remaining jobs
through their dependencies. A job of a stage with no history and no progress of its own adds
nothing it could be measured by: the ETA is then a lower bound ("ETA > 3m"), or unknown where
nothing at all is known.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.progress import JobProgress, duration_text, epoch, read_progress

RUNNING_STATES = ("running",)
QUEUED_STATES = ("pending", "queued")


def stage_history(jobs_dir: Path) -> dict[str, list[float]]:
    """Stage id -> the seconds each successful attempt recorded under ``jobs_dir`` took."""
    history: dict[str, list[float]] = {}
    for folder in sorted(jobs_dir.iterdir()) if jobs_dir.is_dir() else []:
        add_to_history(history, read_progress(folder))
    return history


def add_to_history(history: dict[str, list[float]], progress: JobProgress | None) -> None:
    """Add one job's attempt to ``history`` if it succeeded."""
    if progress is not None and progress.ok and progress.seconds is not None and progress.stage:
        history.setdefault(progress.stage, []).append(progress.seconds)


def expected_seconds(
    stage: str, history: Mapping[str, Sequence[float]], elapsed: float | None = None, own_eta: float | None = None
) -> float | None:
    """How long a job still takes: its own ETA where its progress gives one; else the median of
    its stage's history, less ``elapsed`` for a running job (None once it has run longer than
    that: nothing says how much longer); None without history."""
    if own_eta is not None:
        return own_eta
    past = history.get(stage)
    if not past:
        return None
    left = statistics.median(past) - (elapsed or 0.0)
    return left if left >= 0 else None


@dataclass(frozen=True)
class Remaining:
    """A job that has not ended: its dependencies and the seconds it is expected to take (None: unknown)."""

    key: str
    deps: tuple[str, ...]
    seconds: float | None


@dataclass(frozen=True)
class Estimate:
    """When the study should end: ``seconds`` from now (None: nothing to go on); ``lower_bound``:
    some jobs could not be estimated, so it takes at least that long."""

    seconds: float | None
    lower_bound: bool = False

    def text(self) -> str:
        if self.seconds is None:
            return "ETA unknown (no stage history yet)"
        if self.lower_bound and self.seconds < 1:  # "> 0s" says nothing
            return "ETA unknown"
        if self.lower_bound:
            return f"ETA > {duration_text(self.seconds)}"
        return f"ETA ~{duration_text(self.seconds)}"


def study_eta(jobs: Sequence[Remaining], slots: int) -> Estimate:
    """The study's ETA (see the module docstring): the longer of the known work over ``slots`` and
    the longest chain of remaining jobs (unknown ones count 0 in both, and make it a lower bound)."""
    if not jobs:
        return Estimate(0.0)
    seconds = {job.key: job.seconds for job in jobs}
    known = [s for s in seconds.values() if s is not None]
    unknown = len(known) < len(jobs)
    if not known:
        return Estimate(None, lower_bound=True)
    by_key = {job.key: job for job in jobs}
    chain: dict[str, float] = {}

    def path(key: str) -> float:  # the longest chain of remaining jobs ending with ``key``
        if key not in chain:
            chain[key] = 0.0  # (a cycle cannot happen in a plan; this only guards the recursion)
            job = by_key[key]
            before = [path(d) for d in job.deps if d in by_key]
            chain[key] = (job.seconds or 0.0) + max(before, default=0.0)
        return chain[key]

    longest = max(path(job.key) for job in jobs)
    return Estimate(max(sum(known) / max(1, slots), longest), lower_bound=unknown)


@dataclass(frozen=True)
class Counts:
    """How many of the jobs a submit runs have ended (done, failed, skipped) or not (running, queued)."""

    done: int = 0
    running: int = 0
    failed: int = 0
    queued: int = 0
    skipped: int = 0  # skipped or cancelled: will not run in this submit
    total: int = 0


def summary_line(study: str, counts: Counts, elapsed: float | None, estimate: Estimate | None) -> str:
    """``study demo: 3/10 done, 2 running, 0 failed, 5 queued; elapsed 1m 20s, ETA ~4m 10s``."""
    parts = [f"{counts.done}/{counts.total} done", f"{counts.running} running"]
    parts += [f"{counts.failed} failed", f"{counts.queued} queued"]
    if counts.skipped:
        parts.append(f"{counts.skipped} skipped")
    times = [f"elapsed {duration_text(elapsed)}"] if elapsed is not None else []
    if estimate is not None and (counts.running or counts.queued):
        times.append(estimate.text())
    return f"study {study}: " + ", ".join(parts) + ("; " + ", ".join(times) if times else "")


def running_elapsed(progress: JobProgress | None, now: float) -> float | None:
    """Seconds a running job has run, by its progress file (None without one)."""
    return None if progress is None else max(0.0, now - epoch(progress.started_at))


@dataclass(frozen=True)
class StudyProgress:
    """For ``status``: each running job's latest progress, and, while jobs remain, how long the
    study has run (since its submit) and its estimate."""

    jobs: dict[str, JobProgress]  # running job key -> its latest progress
    elapsed_s: float | None = None
    estimate: Estimate | None = None  # None: no job remains

    def text(self) -> str:
        """``elapsed 1m 20s, ETA ~4m 10s`` ("" when no job remains)."""
        if self.estimate is None:
            return ""
        elapsed = f"elapsed {duration_text(self.elapsed_s)}, " if self.elapsed_s is not None else ""
        return elapsed + self.estimate.text()

    def to_dict(self) -> dict[str, Any]:
        estimate = self.estimate
        return {
            "elapsed_s": self.elapsed_s,
            "eta_s": None if estimate is None else estimate.seconds,
            "eta_lower_bound": None if estimate is None else estimate.lower_bound,
        }


def study_progress(
    jobs_dir: Path, jobs: Sequence[Mapping[str, Any]], shown: Mapping[str, str], submitted_at: str | None
) -> StudyProgress:
    """The study's progress for ``status``: ``jobs``: plan.json's entries; ``shown``: job key -> the
    state status shows. The slots of the estimate: as many jobs as run now."""
    now = time.time()
    history = stage_history(jobs_dir)
    progress: dict[str, JobProgress] = {}
    remaining: list[Remaining] = []
    for job in jobs:
        key = str(job["key"])
        state = shown.get(key, "unknown")
        if state not in RUNNING_STATES + QUEUED_STATES:
            continue
        found = read_progress(jobs_dir / key) if state in RUNNING_STATES else None
        if found is not None:
            progress[key] = found
        own = found.eta_at(now) if found is not None else None
        seconds = expected_seconds(str(job.get("stage_id", "")), history, running_elapsed(found, now), own)
        remaining.append(Remaining(key, tuple(job.get("deps", ())), seconds))
    if not remaining:
        return StudyProgress(progress)
    running = sum(1 for state in shown.values() if state in RUNNING_STATES)
    elapsed = max(0.0, now - epoch(submitted_at)) if submitted_at else None
    return StudyProgress(progress, elapsed, study_eta(remaining, max(1, running)))
