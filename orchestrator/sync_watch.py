"""``python -m orchestrator sync STUDY --watch``: upload a study's offline W&B runs while its jobs
run, from a login node (near-live sync for compute nodes without internet, as ``wandb-osh`` does).

When a job's W&B run ends, the job drops a trigger, ``studies/<study>/wandb-ready/<key>``
(``orchestrator.tracking.wandb_files``). Every ``interval`` seconds a round reads that one folder
(not every job's directory) and, with ``orchestrator.sync``'s machinery:

- a triggered job waits while one of its upstream jobs has a W&B run that is not uploaded yet (an
  upstream without a W&B run, e.g. cached or tracked locally, holds nothing up); an upstream whose
  run has ended without a trigger (an earlier submission's, say) is uploaded in the same round;
- the jobs that may go are uploaded producers first, one bounded ``wandb sync`` per DAG level (a job
  whose upstream failed in this round waits); their offline inputs are declared through W&B's API;
- a job whose runs are all uploaded loses its trigger; a failed upload keeps it, for the next round.

When every job of the plan has ended (as ``status`` tells it: recorded states, and each backend's
word on the jobs it queued), a last full ``sync`` takes what had no trigger, and the command exits
like ``sync`` (0, or 1 if anything failed). Ctrl-C or SIGTERM stops the upload in flight: exit 130.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from orchestrator.errors import BadArgument
from orchestrator.paths import StudyPaths
from orchestrator.records import JobState, read_state
from orchestrator.sync import (
    DEFAULT_TIMEOUT_S,
    UNFINISHED,
    RunDir,
    SyncReport,
    job_runs,
    levels,
    link_inputs,
    plan_jobs,
    sync_env,
    sync_study,
    upload_batch,
)
from orchestrator.tracking.wandb_files import all_uploaded, marker_path, read_marker, read_ready

DEFAULT_INTERVAL_S = 30.0
SYNC_LOG = "wandb-sync.log"  # in the study's directory: what wandb sync printed while watching


@dataclass
class Watch:
    """What one ``sync --watch`` knows between rounds."""

    paths: StudyPaths
    jobs: dict[str, dict[str, Any]]  # key -> plan entry, in plan (topological) order
    depth: dict[str, int]
    uploaded: set[str] = field(default_factory=set)  # jobs whose W&B runs are all uploaded
    ended: set[str] = field(default_factory=set)
    uploads: int = 0  # runs uploaded so far
    foreign: set[str] = field(default_factory=set)  # triggers of jobs not in the plan (told once)
    told: set[str] = field(default_factory=set)  # jobs said to be waiting (told once)

    @classmethod
    def of(cls, paths: StudyPaths) -> Watch:
        jobs = plan_jobs(paths)
        return cls(paths, {j["key"]: j for j in jobs}, levels(jobs))


def upstream_state(w: Watch, key: str) -> str:
    """``done`` (uploaded, or no W&B run to wait for), ``ended`` (its run ended, not uploaded) or
    ``running`` (its run has not ended)."""
    if key in w.uploaded:
        return "done"
    marker = read_marker(marker_path(w.paths, key))
    if marker is None or not marker.get("runs"):
        return "done"
    if all_uploaded(marker):
        w.uploaded.add(key)
        return "done"
    return "ended" if marker.get("finished") else "running"


def ready_jobs(w: Watch, triggered: set[str]) -> tuple[list[str], dict[str, str]]:
    """The jobs to upload this round, in plan order (triggered ones, and the ended upstream runs
    they wait for), and the jobs that wait, with the upstream job they wait for."""
    wanted = set(triggered)
    for key in reversed(list(w.jobs)):  # consumers before their producers: whole chains are pulled in
        if key in wanted:
            wanted.update(d for d in w.jobs[key]["deps"] if d in w.jobs and upstream_state(w, d) == "ended")
    ready: list[str] = []
    waiting: dict[str, str] = {}
    for key in (k for k in w.jobs if k in wanted):
        deps = (d for d in w.jobs[key]["deps"] if d in w.jobs and d not in ready)
        blocker = next((d for d in deps if upstream_state(w, d) != "done"), None)
        if blocker is None:
            ready.append(key)
        else:
            waiting[key] = blocker
    return ready, waiting


def upload_ready(
    w: Watch, ready: list[str], report: SyncReport, waiting: dict[str, str], *, env: dict[str, str], timeout_s: float
) -> list[str]:
    """Upload the ready jobs' runs, one ``wandb sync`` per DAG level; the jobs now fully uploaded.
    A job whose upstream failed in this round waits for the next one (added to ``waiting``)."""
    failed: set[str] = set()
    done: list[str] = []
    for level in sorted({w.depth[k] for k in ready}):
        batch: list[RunDir] = []
        jobs = []
        for key in (k for k in ready if w.depth[k] == level):
            blocker = next((d for d in w.jobs[key]["deps"] if d in failed), None)
            if blocker is not None:
                failed.add(key)
                waiting[key] = blocker
                continue
            marker = read_marker(marker_path(w.paths, key)) or {}
            todo, _ = job_runs(w.paths, w.jobs[key], marker)
            batch.extend(todo)
            jobs.append(key)
        if batch:
            output = w.paths.dir / SYNC_LOG  # wandb's own lines: one line per run is printed here
            upload_batch(w.paths, batch, report, env=env, timeout_s=timeout_s, echo=lambda _: None, output=output)
        failed_labels = {label for label, _ in report.failed}
        for key in jobs:
            (failed.add if w.jobs[key]["label"] in failed_labels else done.append)(key)
    return done


def watch_round(
    w: Watch, *, env: dict[str, str], timeout_s: float, echo: Callable[[str], None], api_factory: Callable[[], Any] | None
) -> SyncReport:
    """One round: read the triggers, upload what may go, declare its inputs, drop handled triggers."""
    triggers = read_ready(w.paths)
    stamps = {k: _stamp(p) for k, p in triggers.items()}
    for key in sorted(set(triggers) - set(w.jobs) - w.foreign):
        w.foreign.add(key)
        echo(f"skipped  {key[:12]}: not in the study's submitted plan (run `sync` after its submit)")
    triggered = {k for k in triggers if k in w.jobs}
    w.uploaded -= triggered  # a job that ran again since (a requeue) has a new run to upload
    report = SyncReport()
    ready, waiting = ready_jobs(w, triggered)
    done = upload_ready(w, ready, report, waiting, env=env, timeout_s=timeout_s) if ready else []
    if done:
        link_inputs(w.paths, report, echo, api_factory, keys=done)
    for key in done:
        w.uploaded.add(key)
        if key in triggers:
            drop_trigger(triggers[key], stamps[key])
    for run in report.synced:
        w.uploads += 1
        echo(f"synced   {run.label}: {run.name}")
    for label, why in report.failed:
        echo(f"FAILED   {label}: {why} (retried next round)")
    for key, blocker in waiting.items():
        if key in triggered and key not in w.told:
            w.told.add(key)
            echo(f"waiting  {w.jobs[key]['label']}: for {w.jobs[blocker]['label']}'s W&B run to be uploaded")
    return report


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def drop_trigger(path: Path, stamp: int | None) -> None:
    """Remove a handled trigger, unless a new attempt of its job has rewritten it since it was read."""
    if stamp is not None and _stamp(path) == stamp:
        path.unlink(missing_ok=True)


def unfinished(w: Watch) -> list[str]:
    """The plan's jobs that have not ended: recorded states, then each backend's word on those."""
    states: dict[str, JobState | None] = {}
    for key in w.jobs:
        if key not in w.ended:
            state = read_state(w.paths, key)
            if state is not None and state.state not in UNFINISHED:
                w.ended.add(key)
            else:
                states[key] = state
    if states:
        from orchestrator.executors.registry import backend, names

        for name in names():  # e.g. a SLURM job cancelled before it started recorded nothing
            for key, (told, _) in backend(name).status(w.paths, states).rows.items():
                if key in states and told not in UNFINISHED:
                    w.ended.add(key)
    return [k for k in w.jobs if k not in w.ended]


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a logout) stops the watch like Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def watch_study(
    paths: StudyPaths,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    echo: Callable[[str], None] = print,
    api_factory: Callable[[], Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncReport:
    """Upload the study's runs as their jobs end, until every job has ended; then a full sync."""
    w = Watch.of(paths)
    env, _ = sync_env(paths)
    echo(f"study {paths.study}: watching {len(w.jobs)} jobs' W&B runs every {interval_s:g} s (Ctrl-C to stop)")
    with sigterm_interrupts():
        try:
            while True:
                everything_ended = not unfinished(w)  # before the round: a job that ends during it has its trigger
                watch_round(w, env=env, timeout_s=timeout_s, echo=echo, api_factory=api_factory)
                if everything_ended:
                    break
                sleep(interval_s)
        except KeyboardInterrupt:
            echo(f"interrupted: {w.uploads} runs uploaded; run sync (or sync --watch) again to go on")
            raise
        echo(f"every job has ended; {w.uploads} runs uploaded while watching; a last sync of the rest:")
        report = sync_study(paths, timeout_s=timeout_s, echo=echo, api_factory=api_factory)
    for key, path in read_ready(paths).items():  # triggers of jobs that the last sync uploaded
        marker = read_marker(marker_path(paths, key))
        if marker is None or all_uploaded(marker):
            path.unlink(missing_ok=True)
    return report


def sync_command(paths: StudyPaths, *, dry_run: bool, watch: bool, timeout_s: float, interval_s: float) -> int:
    """``sync`` as the command line asks for it: 0 when everything is uploaded and linked, else 1."""
    for option, value in (("--timeout", timeout_s), ("--interval", interval_s)):
        if not 0 < value < math.inf:
            raise BadArgument(f"sync {option} {value:g}: give a number of seconds above 0")
    if watch and dry_run:
        raise BadArgument("sync: --watch uploads as jobs end and has no --dry-run; drop one of them")
    if watch:
        return 0 if watch_study(paths, interval_s=interval_s, timeout_s=timeout_s).ok else 1
    return 0 if sync_study(paths, dry_run=dry_run, timeout_s=timeout_s).ok else 1
