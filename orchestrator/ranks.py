"""Several processes per job (data-parallel ranks): how many, the environment each gets
(torchrun's protocol), and how their exit codes make the job's. ``stageproc`` forks them.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.exitcodes import EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from orchestrator.procutil import kill_group

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def stage_processes(processes: int | None, gpus: int) -> int:
    """How many processes run a job's stage: ``resources.processes``, else one per GPU when the
    job asks for several, else 1."""
    if processes is not None:
        return processes
    return gpus if gpus > 1 else 1


def rank_environment(rank: int, world_size: int, port: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables rank ``rank`` of ``world_size`` (all on this node) gets: torchrun's protocol,
    and its share of the job's ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` where ``environ`` sets them."""
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for var in THREAD_VARS:
        value = environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            env[var] = str(max(1, int(value) // world_size))
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (rank 0's rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_failed(code: int) -> bool:
    """A rank's exit code (negative: killed by that signal) that fails the job or stops it without a
    checkpoint: the other ranks cannot go on without it."""
    return code not in (EXIT_OK, EXIT_INTERRUPTED)


def ranks_outcome(ended: Sequence[tuple[int, int]], world_size: int) -> tuple[int, str]:
    """The job's exit code and failure message from ``(rank, exit code)`` in the order the ranks
    ended: the first rank that failed decides (exit 4 stays 4: stopped without a checkpoint; any
    other failure is 1); what the others did after it is its consequence. Else 3 if a rank was
    interrupted after a checkpoint, else 0."""
    for rank, code in ended:
        if code == EXIT_ABORTED:
            return EXIT_ABORTED, ""
        if rank_failed(code):
            how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
            return EXIT_FAILED, f"rank {rank} of {world_size} {how}; the other ranks were stopped"
    if any(code == EXIT_INTERRUPTED for _, code in ended):
        return EXIT_INTERRUPTED, ""
    return EXIT_OK, ""


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class Rank:
    """A stage process's place among its job's ranks; ``group``: rank 0's pid (0 for rank 0 itself)."""

    rank: int
    world_size: int
    group: int
    environ: Mapping[str, str]


class RankReaper:
    """Reaps each rank in a thread of its own, in the order they end; when one fails, kills the
    whole group at once (the others would wait for it in their next collective operation)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.ended: list[tuple[int, int]] = []  # (rank, exit code), in the order they ended
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._reap, args=(rank, pid), name=f"stage-rank-{rank}", daemon=True)
            for rank, pid in enumerate(self.pids)
        ]
        for thread in self._threads:
            thread.start()

    def _reap(self, rank: int, pid: int) -> None:
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped elsewhere: its exit code is lost
            code = EXIT_FAILED
        with self._lock:
            self.ended.append((rank, code))
            if rank_failed(code) and len(self.ended) < len(self.pids):  # (an unreaped rank keeps the group id)
                kill_group(self.pids[0])

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
