"""The job side of the local executor: what the submitting process hands a job process, and
what that process does (log into the job's file, stop with its submitter, run the runner, record
its own state when nobody else will). Jobs are forked from a fork server (``job_context``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from orchestrator.paths import StudyPaths
from orchestrator.procutil import alive, set_parent_death_signal
from orchestrator.records import State, read_state, write_state
from orchestrator.runner import JobStopped

FORKSERVER_PRELOAD = ("orchestrator.runner", "orchestrator.guard", "orchestrator.executors.local")  # see _context
EXECUTOR = "local"  # (LocalExecutor.name) the executor its state records name
SUBMITTER_POLL_S = 0.5  # where there is no parent-death signal: how often a job checks its submitter


@dataclass(frozen=True)
class _JobStart:
    """What a job process gets from the submitting process (pickled to the forkserver)."""

    paths: StudyPaths
    key: str
    force: bool
    environ: dict[str, str]  # the submitter's environment now (the server was forked earlier)
    cwd: str
    code: dict[str, Any]  # runner.code_provenance() of the submitter
    submitter: int  # its pid: the job stops when it dies


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. inside a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _context() -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    """Fork jobs from a server that imported the engine once (spawn where there is no forkserver).

    The server preloads this module too: it holds the job's entry point, which a job process
    would otherwise import (and, without bytecode caches, compile) for itself. It never preloads
    a stage package, although importing one is a fifth of a trivial job: stages import numpy &
    co., whose thread pools read the job's ``OMP_NUM_THREADS`` when they are imported, and the
    server lives as long as this process, so it would go on forking jobs from stage code that
    has since changed on disk.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return ctx


# ------------------------------------------------------------------------------ the job process
def _job_main(job: _JobStart) -> None:
    """A job process: its own session (so signals reach the whole job), output to its log, then
    what ``python -m orchestrator run-job RECORD`` runs, with the submitter's code provenance."""
    os.setsid()
    _release_fork_server()
    os.environ.clear()
    os.environ.update(job.environ)
    os.chdir(job.cwd)
    job_paths = job.paths.job(job.key)
    _log_to(job_paths.log)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from orchestrator.runner import run_job_command

    try:
        # until the runner installs its own handlers: stop as cleanly as they would (nothing
        # has started yet), not die at once unrecorded
        signal.signal(signal.SIGTERM, _stop_before_the_stage)
        _stop_with_submitter(job.submitter)
        rc = run_job_command(job_paths.record, force=job.force, code=job.code)
    except JobStopped as e:
        print(f"stopped by {e} before the stage started; nothing was committed", flush=True)
        rc = EXIT_INTERRUPTED
    if not alive(job.submitter):
        _record_orphaned(job, rc)
    # SystemExit is how a multiprocessing target sets its exit code while still running the
    # process's finalizers (which release e.g. tqdm's semaphores instead of leaking them)
    sys.exit(rc)


def _log_to(log: Path) -> None:
    """Send stdout and stderr to the job's log; a job that cannot open it (a full disk) fails
    with one line on the submitter's terminal, not a traceback."""
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        print(f"job {log.parent.name[:12]}: cannot open its log {log}: {e.strerror or e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _release_fork_server() -> None:
    """Close this job's copy of the write end of the fork server's "alive" pipe.

    multiprocessing hands one to every process that the server forks, so that the server lives
    on while any of them runs. A job holding it would keep the server alive after its submitter
    was SIGKILLed, and so itself: it learns of its submitter's death by its parent's, the
    server's (see ``_stop_with_submitter``). A stage that starts processes of its own with the
    forkserver method gets a server of its own anyway (this one's address is not inherited).
    """
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)  # private: hence the care
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


def _stop_before_the_stage(signum: int, frame: object) -> None:
    raise JobStopped(signal.Signals(signum).name)


def _stop_with_submitter(submitter: int) -> None:
    """Have SIGTERM sent to this job when its submitter dies, so that it never runs on unwatched.

    The job's parent is the fork server, which exits when the submitter dies, however it dies
    (the end of a pipe that the server watches closes; see ``_release_fork_server``). So on
    Linux the job asks for SIGTERM as its parent-death signal, then checks that the parent it
    saw before asking still lives (if it died in between, no signal would come). Elsewhere a
    thread of the job polls the submitter.
    """
    parent = os.getppid()
    if not set_parent_death_signal(signal.SIGTERM):
        threading.Thread(target=_watch_submitter, args=(submitter,), name="submitter-watch", daemon=True).start()
    elif os.getppid() != parent or not alive(submitter):
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_submitter(submitter: int) -> None:
    while alive(submitter):
        time.sleep(SUBMITTER_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _record_orphaned(job: _JobStart, rc: int) -> None:
    """Record the outcome of a job whose submitter died: no one else will. Only over the state
    that its submitter wrote for this very process, never over a newer submit's."""
    state: State = "succeeded" if rc == EXIT_OK else "failed" if rc == EXIT_FAILED else "cancelled"
    message = f"its submitter (pid {job.submitter}) died"
    print(f"{message}; recorded as {state}", flush=True)
    pid = str(os.getpid())
    with contextlib.suppress(OSError, ValueError):  # ValueError: a state file that is not one
        current = read_state(job.paths, job.key)
        if current is not None and current.state == "running" and current.external_id == pid:
            fields = {"executor": EXECUTOR, "external_id": pid, "message": message, "attempt": current.attempt}
            write_state(job.paths, job.key, state, exit_code=rc, **fields)


# -------------------------------------------------------------------------- the submit's loop
