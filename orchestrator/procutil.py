"""Small process helpers (Linux first, portable where it is cheap): is a process alive, who is
its parent and who are its children, and asking the kernel for a signal when one's parent dies."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PROC = Path("/proc")


def set_parent_death_signal(sig: signal.Signals) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where there is no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        zero = ctypes.c_ulong(0)
        return int(libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(int(sig)), zero, zero, zero)) == 0
    except (OSError, AttributeError):
        return False


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None if gone."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: not a zombie (dead, not reaped yet: where init does not
    reap, a dead submitter or job stays one for good)."""
    if PROC.joinpath("self").exists():
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parent_of(pid: int) -> int | None:
    """``pid``'s parent, where /proc tells (None if it has gone)."""
    stat = _proc_stat(pid)
    return int(stat[1]) if stat else None


def children(pid: int, command: str) -> list[int]:
    """The live child processes of ``pid`` whose command name is ``command``, where /proc tells
    (else none)."""
    found = []
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = rest.split()
        if name.partition("(")[2] == command and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def kill_group(pid: int) -> None:
    """SIGKILL process group ``pid``, if it is still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
