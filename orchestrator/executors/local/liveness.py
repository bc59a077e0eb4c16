"""Whether a local submit of a study still runs, for ``status`` (and ``sync --watch``, which waits
for every job to end) after a submit died without recording its jobs' ends.

A submit holds a shared ``flock`` on ``studies/<study>/local-submit.lock`` for as long as it runs
(concurrent submits of one study each hold it). The kernel drops the lock when the submit's process
dies, even by SIGKILL, and job processes do not hold it: the descriptor is closed on exec, and jobs
are forked from a fork server that was started by exec. When no submit holds it, a job that a local
submit recorded as pending or queued will never start, and one recorded as running whose process
has gone ended without recording how: ``status`` shows the first cancelled and the second failed.
Their state files are left as they are: the next submit rewrites them. ``flock`` rather than the
store's POSIX ``lockf``: it belongs to an open file, not a process, so it answers right within one
process too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from orchestrator.paths import StudyPaths
from orchestrator.procutil import alive
from orchestrator.records import JobState

LOCK_FILE = "local-submit.lock"  # in the study's directory
WAITING = ("pending", "queued")


def _lock_path(paths: StudyPaths) -> Path:
    return paths.dir / LOCK_FILE


@contextlib.contextmanager
def submitting(paths: StudyPaths) -> Iterator[None]:
    """Hold the study's submit lock (shared) for the block: a local submit of it runs."""
    path = _lock_path(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # (not inheritable: no job process holds it)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file, in a store shared by a group
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def any_submitting(paths: StudyPaths) -> bool:
    """Whether a local submit of the study holds its lock now. The lock file is opened read-only
    where this user may not write it (a shared store); where it cannot be opened or locked at all,
    the answer is yes, so that no job is shown as ended on a guess."""
    fd = -1
    for flags in (os.O_RDWR, os.O_RDONLY):  # (NFS's emulated flock wants a writable file for LOCK_EX)
        try:
            fd = os.open(_lock_path(paths), flags)
            break
        except FileNotFoundError:
            return False
        except OSError:
            continue
    if fd < 0:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a submit holds it
        return True
    finally:
        os.close(fd)  # (drops the lock this took, if it took it)
    return False


def _gone(state: JobState) -> bool:
    """A running job's process has ended (or it recorded none)."""
    try:
        return not alive(int(state.external_id or ""))
    except ValueError:
        return True


def orphaned_rows(paths: StudyPaths, states: Mapping[str, JobState | None], executor: str) -> dict[str, tuple[str, str]]:
    """``status`` rows (shown state, where) for the jobs of dead local submits, as the module says."""
    unended = {k: s for k, s in states.items() if s and s.executor == executor and s.state in (*WAITING, "running")}
    if not unended or any_submitting(paths):
        return {}
    rows = {}
    for key, state in unended.items():
        if state.state in WAITING:
            rows[key] = ("cancelled", "never started: its submit has ended")
        elif _gone(state):
            rows[key] = ("failed", f"local {state.external_id}: ended without recording how (its submit has ended)")
    return rows
