"""What a local submit shows while its jobs run: the study's progress (done, running, failed, queued,
elapsed, an ETA from the stage history: ``orchestrator.progress_study``) and each running job's
latest progress (from its ``progress.json``: ``orchestrator.progress``).

- On a terminal: a compact block under the per-job lines, redrawn in place at most once a second
  (ANSI cursor movement): the study's line, then one line per running job (at most
  ``MAX_JOB_LINES``). A per-job line (done, FAILED, ...) is printed above it.
- Elsewhere (a pipe, a file, a CI log): one plain status line every ``ORCHESTRATOR_PROGRESS_INTERVAL_S``
  seconds (default 30), besides the per-job lines.
- Under ``-q``: neither, and no per-job "done" lines either (failures and warnings still show).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from orchestrator import console
from orchestrator.errors import BadArgument
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.progress import duration_text, progress_cell, read_progress
from orchestrator.progress_study import (
    Counts,
    Remaining,
    add_to_history,
    expected_seconds,
    running_elapsed,
    stage_history,
    study_eta,
    summary_line,
)

INTERVAL_ENV = "ORCHESTRATOR_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0  # the plain status line, where stdout is not a terminal
REDRAW_S = 1.0  # the terminal block, at most once a second ...
REDRAW_AFTER_LINE_S = 0.25  # ... but sooner (with fresh counts) once a per-job line has pushed it away
MAX_JOB_LINES = 8  # running jobs listed in the terminal block
MAX_JOBS_INLINE = 3  # running jobs named in the plain status line
CLOCK_SLACK_S = 2.0  # a progress file that started this much before its job did is an earlier run's


@dataclass(frozen=True)
class Snapshot:
    """The submit's state now: counts, each running job's seconds so far, the jobs still waiting."""

    counts: Counts
    running: Mapping[str, float]
    waiting: Sequence[str]


def interval_s(environ: Mapping[str, str]) -> float:
    """Seconds between plain status lines: ``ORCHESTRATOR_PROGRESS_INTERVAL_S`` or the default."""
    text = environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BadArgument(f"{INTERVAL_ENV}={text!r}: expected the seconds between status lines, a positive number")
    return value


class LiveView:
    """The live view of one submit's loop (see the module docstring). ``mode``: "tty", "plain" or
    "quiet". The loop passes every line through ``say`` (kept) or ``note`` (dropped under -q),
    calls ``tick`` once per turn, ``finished`` for each job that succeeded, ``close`` at the end."""

    def __init__(
        self,
        paths: StudyPaths,
        plan: Plan,
        slots: int,
        echo: Callable[[str], None],
        mode: str,
        *,
        interval: float = DEFAULT_INTERVAL_S,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths, self.plan, self.slots, self._echo, self.mode = paths, plan, slots, echo, mode
        self.interval = REDRAW_S if mode == "tty" else interval
        self.stream = stream or sys.stdout
        self.clock = clock
        self.started = self.last = clock()
        self.history = stage_history(paths.dir / "jobs") if mode != "quiet" else {}
        self.block: list[str] = []  # the terminal block's lines, as drawn last
        self.shown = 0  # how many of them are on the screen now
        self.deps: dict[str, tuple[str, ...]] = {}  # (Job.deps builds its tuple on each call)

    @classmethod
    def for_submit(cls, paths: StudyPaths, plan: Plan, slots: int, echo: Callable[[str], None]) -> LiveView:
        """The view for a submit printing through ``echo``: on a terminal where that is ``print``
        to one, plain elsewhere, quiet under -q."""
        mode = "quiet" if console.quiet() else "tty" if echo is print and sys.stdout.isatty() else "plain"
        return cls(paths, plan, slots, echo, mode, interval=interval_s(os.environ))

    def say(self, line: str) -> None:
        """A line that stays (a job's outcome, a warning); on a terminal it takes the block's place
        until the next ``tick`` draws the block again, below it, with fresh counts."""
        self._erase()
        self._echo(line)

    def note(self, line: str) -> None:
        """A line of progress chatter (a job done): dropped under -q."""
        if self.mode != "quiet":
            self.say(line)

    def finished(self, key: str) -> None:
        """A job succeeded: its duration joins the stage history."""
        if self.mode != "quiet":
            add_to_history(self.history, read_progress(self.paths.job(key).dir))

    def tick(self, snapshot: Callable[[], Snapshot]) -> None:
        now = self.clock()
        pushed_away = self.mode == "tty" and bool(self.block) and not self.shown and now - self.last >= REDRAW_AFTER_LINE_S
        if self.mode == "quiet" or (now - self.last < self.interval and not pushed_away):
            return
        self.last = now
        summary, jobs = self.render(snapshot())
        if self.mode == "tty":
            self._erase()
            self.block = [summary, *jobs]
            self._draw()
        else:
            more = f", +{len(jobs) - MAX_JOBS_INLINE} more" if len(jobs) > MAX_JOBS_INLINE else ""
            self._echo(summary + (f"; running: {', '.join(jobs[:MAX_JOBS_INLINE])}{more}" if jobs else ""))

    def close(self) -> None:
        """Take the terminal block away (the final summary follows)."""
        self._erase()
        self.block = []

    def render(self, snap: Snapshot) -> tuple[str, list[str]]:
        """The study's line, and one ``label: progress`` text per running job."""
        wall = time.time()
        remaining, jobs = [], []
        for key, seconds in snap.running.items():
            job = self.plan.by_key[key]
            progress = read_progress(self.paths.job(key).dir)
            elapsed = running_elapsed(progress, wall)  # (the attempt's, as the history measures it)
            if elapsed is None or elapsed > seconds + CLOCK_SLACK_S:  # none yet, or an earlier run's
                progress, elapsed = None, seconds
            cell = progress_cell(progress, wall)
            jobs.append(f"{job.label}: {cell + ', ' if cell else ''}running {duration_text(seconds)}")
            own = progress.eta_at(wall) if progress is not None else None
            remaining.append(Remaining(key, self._deps(key), expected_seconds(job.stage_id, self.history, elapsed, own)))
        for key in snap.waiting:
            remaining.append(Remaining(key, self._deps(key), expected_seconds(self.plan.by_key[key].stage_id, self.history)))
        estimate = study_eta(remaining, self.slots)
        return summary_line(self.plan.study.name, snap.counts, self.clock() - self.started, estimate), jobs

    def _deps(self, key: str) -> tuple[str, ...]:
        if key not in self.deps:
            self.deps[key] = self.plan.by_key[key].deps
        return self.deps[key]

    def _draw(self) -> None:
        if self.mode != "tty" or not self.block:
            return
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        lines = [self.block[0]] + [f"  {line}" for line in self.block[1 : 1 + MAX_JOB_LINES]]
        if len(self.block) - 1 > MAX_JOB_LINES:
            lines.append(f"  ... and {len(self.block) - 1 - MAX_JOB_LINES} more running")
        self.stream.write("".join(line[:width] + "\n" for line in lines))
        self.stream.flush()
        self.shown = len(lines)

    def _erase(self) -> None:
        if self.mode == "tty" and self.shown:
            self.stream.write(f"\x1b[{self.shown}F\x1b[J")  # to the block's first line, then clear below
            self.stream.flush()
            self.shown = 0
