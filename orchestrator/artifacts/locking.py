"""An exclusive lock on a file that works across processes, threads and NFS.

``fcntl.lockf`` takes a POSIX record lock: NFS supports it through its lock manager, and the kernel
releases it when the holding process dies, even by SIGKILL, so a crashed job never leaves a stale
lock behind. POSIX locks belong to a process, not a thread (and closing any descriptor of the file
drops them), so threads of one process are serialised first by a ``threading.Lock`` per lock path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_POLL_S = 0.02
_thread_locks: dict[str, threading.Lock] = {}
_registry_lock = threading.Lock()


class LockTimeout(TimeoutError):
    """The lock could not be taken within the timeout; the message names the lock file."""


def _thread_lock(path: Path) -> threading.Lock:
    with _registry_lock:
        return _thread_locks.setdefault(str(path), threading.Lock())


def holder(path: Path) -> str:
    """Who holds (or last held) the lock on ``path``, as its holder noted in the file."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _timeout_error(path: Path, timeout_s: float | None) -> LockTimeout:
    return LockTimeout(
        f"timed out after {timeout_s}s waiting for lock file {path} (last holder: {holder(path)}); "
        "another process is still working on it - wait and retry, or stop that process"
    )


def _acquire(fd: int, path: Path, deadline: float | None, timeout_s: float | None) -> None:
    if deadline is None:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        return
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            raise _timeout_error(path, timeout_s)
        time.sleep(_POLL_S)


def _write_holder(fd: int) -> None:
    """Note who holds the lock in the file itself, for the timeout message of others."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


@contextmanager
def file_lock(path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``timeout_s=None`` waits forever; otherwise LockTimeout is raised after ``timeout_s`` seconds.
    """
    path = Path(path).resolve()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    tlock = _thread_lock(path)
    if not tlock.acquire(timeout=-1 if timeout_s is None else timeout_s):
        raise _timeout_error(path, timeout_s)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _acquire(fd, path, deadline, timeout_s)
            try:
                _write_holder(fd)
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        tlock.release()
