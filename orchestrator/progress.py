"""A running job's progress: how a stage reports it (``ctx.progress(done, total, unit)``), what the
runner makes of it, and how it reads back.

- The stage process (``ProgressSender``) passes at most ``SEND_INTERVAL_S``-spaced updates to the
  runner over the pipe that carries its metrics (a new total or unit, and the final update, are
  sent at once; the latest is sent when the stage returns). Ranks other than 0 send nothing.
- The runner (``ProgressRecorder``) keeps the job's latest progress in ``progress.json`` in the
  job's folder (atomically, at most once per ``WRITE_INTERVAL_S``): ``done``, ``total``, ``unit``,
  ``rate`` (units per second over the last ``RATE_WINDOW_S``), ``updated_at``, and for the whole
  attempt ``started_at``, ``ended_at``, ``seconds`` and ``ok`` (the stage history that study-level
  ETAs come from). It prints one plain line per update to the job log: the first, one every
  ``LOG_INTERVAL_S`` or at each tenth of the total, and the last, e.g.
  ``prune[language=en]: 120/800 steps (15%), 3.2 steps/s, ETA 3m 32s``. No carriage returns.
- ``status`` and the local executor's live view read the file back (``read_progress``).
"""

from __future__ import annotations

import datetime as dt
import os
import select
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from orchestrator.fsutil import atomic_write_json, read_json

PROGRESS_FILE = "progress.json"  # in the job's folder (JobPaths.dir)
SEND_INTERVAL_S = 0.1  # stage -> runner: at most ten updates a second
WRITE_INTERVAL_S = 1.0  # runner -> progress.json: at most once a second
LOG_INTERVAL_S = 10.0  # runner -> job log: a line every 10 s (while it changes) ...
LOG_FRACTION = 0.1  # ... or at each tenth of the total
RATE_WINDOW_S = 60.0  # the rate is measured over the last minute
STALE_S = 120.0  # status says how old a running job's progress is once it is older than this

Update = tuple[int, "int | None", str]  # done, total, unit


def progress_path(job_dir: Path) -> Path:
    """The job's progress file."""
    return job_dir / PROGRESS_FILE


def check_update(done: Any, total: Any, unit: Any) -> Update:
    """``ctx.progress``'s arguments as plain values; ValueError for what makes no sense."""
    try:
        n, t = int(done), None if total is None else int(total)
    except (TypeError, ValueError):
        raise ValueError(f"ctx.progress(done={done!r}, total={total!r}): done and total must be whole numbers") from None
    if n < 0 or (t is not None and t < 0):
        raise ValueError(f"ctx.progress(done={done!r}, total={total!r}): done and total cannot be negative")
    if not isinstance(unit, str) or not unit.strip():
        raise ValueError(f"ctx.progress(unit={unit!r}): unit must be a word, e.g. 'step'")
    return n, t, unit.strip()


class ProgressSender:
    """The stage process's side of ``ctx.progress``: updates, thinned out, as messages to ``send``
    (the pipe to the runner); ``send`` None (ranks other than 0) drops them after checking them."""

    def __init__(self, send: Callable[[Mapping[str, Any]], None] | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._send, self._clock = send, clock
        self._last: Update | None = None
        self._sent_at = float("-inf")
        self._pending: Update | None = None

    def report(self, done: Any, total: Any = None, unit: Any = "step") -> None:
        update = check_update(done, total, unit)
        if self._send is None:
            return
        now = self._clock()
        new_phase = self._last is None or update[1:] != self._last[1:]
        final = update[1] is not None and update[0] >= update[1]
        if new_phase and self._pending is not None:
            self._emit(self._pending, now)  # the end of the previous phase, before the next one
        if new_phase or final or now - self._sent_at >= SEND_INTERVAL_S:
            self._emit(update, now)
        else:
            self._pending = update

    def flush(self) -> None:
        """Send the latest update if it has not been sent (when the stage returns)."""
        if self._pending is not None:
            self._emit(self._pending, self._clock())

    def _emit(self, update: Update, now: float) -> None:
        self._last, self._sent_at, self._pending = update, now, None
        if self._send is not None:
            self._send({"progress": {"done": update[0], "total": update[1], "unit": update[2]}})


class JobProgress(BaseModel):
    """What ``progress.json`` holds (see the module docstring); times are ISO 8601 with a zone."""

    model_config = ConfigDict(extra="ignore")

    label: str = ""
    stage: str = ""  # the stage id in the spec (plan's stage_id)
    started_at: str
    updated_at: str
    done: int | None = None  # None: the stage has reported nothing yet
    total: int | None = None
    unit: str = "step"
    rate: float | None = None  # units per second
    ended_at: str | None = None
    seconds: float | None = None  # how long the attempt took, from its start to its commit
    ok: bool | None = None  # None while it runs

    def eta_at(self, now: float) -> float | None:
        """Seconds left at ``now`` at the last rate (None: no total or no rate yet)."""
        eta = job_eta(self.done, self.total, self.rate)
        return None if eta is None else max(0.0, eta - self.age_s(now))

    def age_s(self, now: float) -> float:
        """Seconds since the last update."""
        return max(0.0, now - epoch(self.updated_at))


def epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


def read_progress(job_dir: Path) -> JobProgress | None:
    """The job's latest progress, or None (none recorded, or a file that is not one)."""
    try:
        return JobProgress.model_validate(read_json(progress_path(job_dir)))
    except (OSError, ValueError):
        return None


def job_eta(done: int | None, total: int | None, rate: float | None) -> float | None:
    if done is None or not total or not rate or rate <= 0:
        return None
    return max(0, total - done) / rate


class ProgressRecorder:
    """The runner's side for one attempt: ``start``, then ``update`` for each message from the stage
    and ``tick`` whenever the pipe was quiet for a while (writes a held-back update), then ``end``.
    A file that cannot be written (a full disk) is reported once in the job log; the job goes on."""

    def __init__(
        self,
        path: Path,
        label: str,
        stage: str,
        echo: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path, self.label, self.stage = path, label, stage
        self.echo = echo or (lambda line: print(line, flush=True))
        self.clock = clock
        self.started = clock()
        self.state: Update | None = None
        self.rate: float | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self._written_at = float("-inf")
        self._unwritten = False  # an update not in the file yet
        self._logged: tuple[Update, float] | None = None  # the last update printed, and when
        self._warned = False

    def start(self) -> None:
        self.started = self.clock()
        self._write(self.started)

    def update(self, message: Mapping[str, Any]) -> None:
        try:
            update = check_update(message.get("done"), message.get("total"), message.get("unit", "step"))
        except ValueError:
            return
        now = self.clock()
        if self.state is None or update[1:] != self.state[1:]:
            self._samples.clear()
        self.state = update
        self._sample(now, update[0])
        self._unwritten = True
        final = update[1] is not None and update[0] >= update[1]
        if final or now - self._written_at >= WRITE_INTERVAL_S:
            self._write(now)
        if self._log_due(update, now):
            self._log(update, now)

    def tick(self) -> None:
        now = self.clock()
        if self._unwritten and now - self._written_at >= WRITE_INTERVAL_S:
            self._write(now)

    def end(self, ok: bool) -> None:
        now = self.clock()
        if self.state is not None and (self._logged is None or self._logged[0] != self.state):
            self._log(self.state, now)
        self._write(now, ended=True, ok=ok)

    def _sample(self, now: float, done: int) -> None:
        self._samples.append((now, done))
        while len(self._samples) > 2 and self._samples[1][0] < now - RATE_WINDOW_S:
            self._samples.popleft()
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 - t0 > 0 and d1 >= d0:
            self.rate = (d1 - d0) / (t1 - t0)
        elif len(self._samples) == 1:
            self.rate = None

    def _log_due(self, update: Update, now: float) -> bool:
        if self._logged is None:
            return True
        (done, total, unit), (last, when) = update, self._logged
        if (total, unit) != last[1:]:
            return True
        if done == last[0]:
            return False
        if total and (done >= total or int(done / total / LOG_FRACTION) > int(last[0] / total / LOG_FRACTION)):
            return True
        return now - when >= LOG_INTERVAL_S

    def _log(self, update: Update, now: float) -> None:
        self._logged = (update, now)
        self.echo(job_line(self.label, *update, self.rate))

    def _write(self, now: float, *, ended: bool = False, ok: bool | None = None) -> None:
        done, total, unit = self.state if self.state is not None else (None, None, "step")
        doc = JobProgress(
            label=self.label,
            stage=self.stage,
            started_at=iso(self.started),
            updated_at=iso(now),
            done=done,
            total=total,
            unit=unit,
            rate=self.rate,
            ended_at=iso(now) if ended else None,
            seconds=round(now - self.started, 3) if ended else None,
            ok=ok,
        )
        self._written_at, self._unwritten = now, False
        try:
            atomic_write_json(self.path, doc.model_dump(mode="json"), durable=False)
        except OSError as e:
            if not self._warned:
                self._warned = True
                print(f"{self.label}: warning: cannot write its progress to {self.path}: {e}", file=sys.stderr, flush=True)


def pipe_lines(fd: int, tick: Callable[[], None] | None = None, every_s: float = WRITE_INTERVAL_S) -> Generator[str, None, None]:
    """The lines read from ``fd`` until it closes (decoded; a last line without its newline too),
    calling ``tick`` whenever ``every_s`` passes with nothing to read. Closes ``fd``."""
    buffer = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], every_s if tick is not None else None)
            if not ready:
                if tick is not None:
                    tick()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                yield line.decode("utf-8", errors="replace")
        if buffer:
            yield buffer.decode("utf-8", errors="replace")
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ how it reads
def duration_text(seconds: float) -> str:
    """``42s``, ``3m 32s``, ``2h 05m``, ``1d 3h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def plural(unit: str, n: int | None = 2) -> str:
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def rate_text(rate: float, unit: str) -> str:
    """``3.2 steps/s``; below one a second, ``45.0 s/step``."""
    if rate >= 1:
        return f"{rate:.0f} {plural(unit)}/s" if rate >= 100 else f"{rate:.1f} {plural(unit)}/s"
    return f"{1 / rate:.1f} s/{unit}"


def count_text(done: int, total: int | None, unit: str) -> str:
    """``120/800 steps (15%)``, or ``120 steps`` without a total."""
    if total is None:
        return f"{done} {plural(unit, done)}"
    percent = f" ({100 * done // total}%)" if total else ""
    return f"{done}/{total} {plural(unit, total)}{percent}"


def job_line(label: str, done: int, total: int | None, unit: str, rate: float | None) -> str:
    """The job log's line for one update: ``prune[language=en]: 120/800 steps (15%), 3.2 steps/s, ETA 3m 32s``."""
    parts = [count_text(done, total, unit)]
    if rate:
        parts.append(rate_text(rate, unit))
    eta = job_eta(done, total, rate)
    if eta is not None and total is not None and done < total:
        parts.append(f"ETA {duration_text(eta)}")
    return f"{label}: " + ", ".join(parts)


def progress_cell(progress: JobProgress | None, now: float) -> str:
    """A running job's progress in a few words (``120/800 steps (15%), ETA 3m 32s``); how old it is
    once older than ``STALE_S`` (a hung job); "" where it reported none."""
    if progress is None or progress.done is None:
        return ""
    parts = [count_text(progress.done, progress.total, progress.unit)]
    eta = progress.eta_at(now)
    if eta is not None and progress.total is not None and progress.done < progress.total:
        parts.append(f"ETA {duration_text(eta)}")
    age = progress.age_s(now)
    if age > STALE_S:
        parts.append(f"updated {duration_text(age)} ago")
    return ", ".join(parts)
