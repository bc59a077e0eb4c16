"""Run a stage function in a child process of the runner, so that its outputs are hashed and
committed only once nothing of the stage can still write to them.

A stage that returns while a thread (a data loader, an async checkpoint writer) or a child process
of its own still writes to its outputs would otherwise change files that the store has already
hashed, or taken over as blobs. Here the stage runs in a forked child, in a process group of its
own; when the child has exited, whatever is left in that group is killed, and only then does the
runner (the parent) hash and commit. The child talks to the parent through one pipe of JSON
lines: metrics as the stage logs them (the parent owns the tracking run, so the child never
touches W&B), its progress (``ctx.progress``: ``orchestrator.progress``), then the stage's
returned metadata.

Stop signals (TERM, USR2 for SLURM's time limit, HUP, INT) sent to the runner are answered by one
handler for the whole run (``RunSignals``): before the stage they unwind the runner, while it runs
they go to the stage's process group (whose own handlers decide between a checkpoint and an
immediate stop), after it they are only noted while the runner commits and reports. If the runner
itself dies (even by SIGKILL), the kernel kills the stage (PR_SET_PDEATHSIG).

The fork happens before the runner opens its tracking run, so no W&B threads are forked.

Several processes per job (``executor.resources.<stage>.processes`` > 1: data-parallel training)
---------------------------------------------------------------------------------------------------
The runner forks N stage processes ("ranks") instead of one, all in one process group (rank 0's),
each told its place by the torchrun environment protocol: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` (a free port); ``OMP_NUM_THREADS``
and ``MKL_NUM_THREADS``, when set, are divided among the ranks (``rank_environment``). A stage
that uses torch.distributed (directly or through accelerate) finds its peers from that, and
``ctx.rank`` / ``ctx.world_size`` say the same. The ranks are started here, not by ``torchrun``, so
that a job stays one run: one run lock, one staging folder, one commit and one job record per job
key, whatever the number of processes, and the guarantees above (late writers killed before the
hash, stop signals phase by phase, death with the runner) hold for every rank:

- only rank 0 talks to the runner: its metrics are relayed, its returned metadata is committed;
  the other ranks' ``ctx.log`` and ``ctx.progress`` are dropped, their ``ctx.output_dir`` raises (only rank 0
  writes outputs; a stage guards its writes with ``ctx.rank == 0``);
- stop signals go to the whole group, so every rank sees them (a checkpointing stage must agree
  among its ranks on when to stop, and let rank 0 write the checkpoint);
- a rank that fails (an exit code other than 0 and 3, or death by a signal) gets the others
  killed at once: they could only wait for it in their next collective operation;
- the job's exit code: the first rank to fail decides (1, or 4 if it was stopped without a
  checkpoint); else 3 if any rank was interrupted after a checkpoint; else 0 (``ranks_outcome``).

All ranks of a job run on one node (the job's one allocation); jobs spanning nodes are not
supported yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.exitcodes import EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from orchestrator.procutil import kill_group, set_parent_death_signal
from orchestrator.progress import ProgressRecorder, ProgressSender, pipe_lines
from orchestrator.ranks import Rank, RankReaper, free_port, rank_environment, ranks_outcome
from orchestrator.stage import StageDef, StageInterrupted
from orchestrator.tracking import TrackingRun

FORWARDED = (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT)  # the runner's stop signals
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)
REPEAT_WINDOW_S = 2.0  # stop signals this soon after the first are the same request (see below)


@dataclass
class Context:
    """The StageContext handed to a stage (see orchestrator.stage)."""

    seed: int
    job_label: str
    checkpoint_dir: Path
    staging: Path
    run: TrackingRun
    stop_requested: threading.Event
    provenance: Mapping[str, Any] = field(default_factory=dict)
    gpus: int = 0  # the GPUs the job asked for (executor.resources), 0: none
    rank: int = 0  # this process among the job's ranks (resources.processes; 1 process: rank 0 of 1)
    world_size: int = 1
    reporter: ProgressSender = field(default_factory=lambda: ProgressSender(None))  # set per rank (_child)

    def output_dir(self, name: str) -> Path:
        if self.rank != 0:
            raise RuntimeError(
                f"output_dir({name!r}) called on rank {self.rank} of {self.world_size}: only rank 0 writes a job's "
                "outputs; guard the writes with `if ctx.rank == 0`"
            )
        path = self.staging / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log(metrics, step)

    def progress(self, done: int, total: int | None = None, unit: str = "step") -> None:
        self.reporter.report(done, total, unit)


@dataclass(frozen=True)
class StageResult:
    """How the stage process ended: its exit code and, on success, the metadata it returned."""

    exit_code: int
    metadata: dict[str, Any] | None
    message: str = ""


class _PipeRun(TrackingRun):
    """The child's end of the tracking run: each ``log`` is one JSON line to the parent."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "w", encoding="utf-8", buffering=1)

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.send({"metrics": {k: float(v) for k, v in metrics.items()}, "step": step})

    def send(self, message: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(message) + "\n")

    def finish(self, ok: bool) -> None:
        self._file.close()


class _NullRun(TrackingRun):
    """The tracking run of ranks other than 0: what they log is dropped (rank 0 logs for the job)."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def send(self, message: Mapping[str, Any]) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


class JobStopped(BaseException):
    """Raised in the stage's thread by a stop signal: unwinds the stage without committing anything."""


def install_stop_handlers(event: threading.Event, graceful: bool) -> None:
    """SIGTERM/SIGUSR2/SIGHUP stop the stage. A stage that checkpoints is asked to (``event``) and
    may take its time; any other stage, or a second request, is stopped at once. A signal within
    ``REPEAT_WINDOW_S`` of the first is the same request: one scancel reaches the stage several
    times within milliseconds (from slurmstepd, and passed on by the batch shell and the runner)."""
    first: list[float] = []  # when the first stop signal came

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if not graceful or (first and time.monotonic() - first[0] > REPEAT_WINDOW_S):
            raise JobStopped(name)
        if first:
            return  # the same request again
        first.append(time.monotonic())
        event.set()
        hint = f"another stop signal after {REPEAT_WINDOW_S:.0f}s stops it at once"
        print(f"received {name}: asking the stage to checkpoint and stop ({hint})", file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)


def run_stage_process(
    stage_def: StageDef,
    params: Any,
    inputs: Mapping[str, Any],
    make_context: Callable[[TrackingRun, threading.Event], Context],
    open_run: Callable[[], TrackingRun],
    stops: RunSignals,
    processes: int = 1,
    progress: ProgressRecorder | None = None,
) -> tuple[StageResult, TrackingRun]:
    """Fork, run ``stage_def`` in the child, forward its metrics to the run ``open_run`` opens in
    this process, and return how it ended (with that run, still open) once the child and every
    process it left in its group are gone. ``stops`` (installed by the caller) passes stop signals
    on to the stage while it runs, and only notes them afterwards. ``processes`` > 1: as many
    ranks (see the module's docstring). ``progress``: what the stage's ``ctx.progress`` calls go to."""
    if processes > 1:
        return _run_ranks(stage_def, params, inputs, make_context, open_run, stops, processes, progress)
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    # stop signals wait (blocked) across the fork, until each side has its handlers in place
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid == 0:  # the stage process: never returns
        os.close(read_fd)
        _child(stage_def, params, inputs, make_context, write_fd, parent, blocked)
    with contextlib.suppress(OSError):  # (the child does the same: whoever is first wins)
        os.setpgid(pid, pid)
    stops.stage = pid
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    os.close(write_fd)
    try:
        run = open_run()
        metadata, error = _relay(read_fd, run, progress)
        _, status = os.waitpid(pid, 0)
    except BaseException:
        kill_group(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    finally:
        stops.stage, stops.finishing = None, True
        kill_group(pid)  # late writers the stage left behind
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return StageResult(EXIT_FAILED, None, f"the stage process was killed by {signal.Signals(-code).name}"), run
    return StageResult(code, metadata if code == EXIT_OK else None, "" if code == EXIT_OK else error), run


def _run_ranks(
    stage_def: StageDef,
    params: Any,
    inputs: Mapping[str, Any],
    make_context: Callable[[TrackingRun, threading.Event], Context],
    open_run: Callable[[], TrackingRun],
    stops: RunSignals,
    processes: int,
    progress: ProgressRecorder | None = None,
) -> tuple[StageResult, TrackingRun]:
    """``run_stage_process`` with ``processes`` ranks in one process group (rank 0's): rank 0's
    metrics and metadata come through the pipe, every rank's exit code through ``_Ranks``."""
    port = free_port()
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pids: list[int] = []
    try:
        for rank in range(processes):
            info = Rank(rank, processes, pids[0] if pids else 0, rank_environment(rank, processes, port, os.environ))
            pid = os.fork()
            if pid == 0:  # a stage process: never returns
                os.close(read_fd)
                if rank > 0:
                    os.close(write_fd)
                _child(stage_def, params, inputs, make_context, write_fd if rank == 0 else None, parent, blocked, info)
            pids.append(pid)
            with contextlib.suppress(OSError):  # (the child does the same: whoever is first wins)
                os.setpgid(pid, pids[0])
    except BaseException:  # a fork failed: no rank runs on without the others
        if pids:
            kill_group(pids[0])
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        os.close(read_fd)
        os.close(write_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    stops.stage = pids[0]
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    os.close(write_fd)
    ranks = RankReaper(pids)
    try:
        run = open_run()
        metadata, error = _relay(read_fd, run, progress)
        ranks.wait()
    except BaseException:
        kill_group(pids[0])
        ranks.wait()
        raise
    finally:
        stops.stage, stops.finishing = None, True
        kill_group(pids[0])  # late writers the ranks left behind
    code, message = ranks_outcome(ranks.ended, processes)
    if error and code == EXIT_FAILED:
        message = f"{message} (rank 0: {error})" if message else error
    return StageResult(code, metadata if code == EXIT_OK else None, message), run


class RunSignals:
    """How the runner answers its stop signals (TERM, USR2, HUP, INT), phase by phase, with one
    handler installed for the whole run (``on_stop_signals(stops.handle)``), so that there is no
    moment between phases where the default action (death, with nothing recorded) applies:

    - before the stage starts (waiting for the run lock, resolving inputs): ``JobStopped`` is
      raised, which the runner turns into exit 3 with nothing done;
    - while the stage process runs: passed on to its process group (INT as TERM), where the
      stage's own handlers choose between a checkpoint and an immediate stop;
    - once it has ended (``finishing``): only noted. A commit takes seconds and leaves the store
      consistent either way, while an aborted one would throw away finished work (a SLURM requeue
      would run the whole stage again), and the outcome must still be reported. SIGKILL remains
      for whoever must stop the job at once.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.stage: int | None = None  # the stage process, while it runs
        self.finishing = False
        self.received: list[str] = []  # every stop signal, in order (SIGUSR2: SLURM's time limit)

    def handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.stage is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.stage, signal.SIGTERM if signum == signal.SIGINT else signum)
        elif self.finishing:
            print(f"{self.label}: received {name}; finishing the commit and its record first", flush=True)
        else:
            raise JobStopped(name)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for the runner's stop signals within the block, the previous handlers after
    it (handlers can only be set from the main thread: elsewhere, nothing changes). Nested
    blocks hand the signals from one phase of a run to the next, with no moment in between where
    the default action (death, with nothing recorded) applies."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _relay(fd: int, run: TrackingRun, progress: ProgressRecorder | None = None) -> tuple[dict[str, Any] | None, str]:
    """Pass the child's metrics on to ``run`` (and its progress to ``progress``) until the pipe
    closes; return the stage's metadata (None if it sent none: it failed or was stopped) and the
    error it raised ("" if none)."""
    metadata: dict[str, Any] | None = None
    error = ""
    with contextlib.closing(pipe_lines(fd, progress.tick if progress else None)) as pipe:
        for line in pipe:
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a torn line from a child killed mid-write
            if not isinstance(item, dict):
                continue
            if "progress" in item and progress is not None and isinstance(item["progress"], dict):
                progress.update(item["progress"])
            elif "metrics" in item:
                _log(run, item["metrics"], item.get("step"))
            elif "result" in item:
                metadata = item["result"]
            elif "error" in item:
                error = str(item["error"])
    return metadata, error


def _log(run: TrackingRun, metrics: Mapping[str, float], step: int | None) -> None:
    """Metrics are worth less than the job: one that cannot be logged (a full disk) is reported
    in the job log, and the stage goes on."""
    try:
        run.log(metrics, step)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not log metrics {sorted(metrics)} at step {step}: {e}", file=sys.stderr, flush=True)


def _child(
    stage_def: StageDef,
    params: Any,
    inputs: Mapping[str, Any],
    make_context: Callable[[TrackingRun, threading.Event], Context],
    fd: int | None,
    parent: int,
    mask: set[int | signal.Signals],
    rank: Rank | None = None,
) -> None:
    """The stage process: its own group, dies with the runner, runs the stage, reports, exits.
    Stop signals are blocked on entry; ``mask`` is the signal mask to restore once its own
    handlers are in place (a signal that came in meanwhile is delivered then). ``rank``: one of
    several processes of the job (in rank 0's group, with its environment; ``fd`` None but for
    rank 0)."""
    code = EXIT_FAILED
    pipe: _PipeRun | _NullRun | None = None
    try:
        with contextlib.suppress(OSError):
            os.setpgid(0, rank.group if rank is not None else 0)
        _die_with_parent(parent)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        if rank is not None:
            os.environ.update(rank.environ)
        pipe = _PipeRun(fd) if fd is not None else _NullRun()
        stop = threading.Event()
        install_stop_handlers(stop, graceful=stage_def.checkpoints)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        ctx = make_context(pipe, stop)
        if rank is not None:
            ctx = dataclasses.replace(ctx, rank=rank.rank, world_size=rank.world_size)
        ctx.reporter = ProgressSender(pipe.send if isinstance(pipe, _PipeRun) else None)  # only rank 0 reports
        code = _call_stage(stage_def, params, inputs, ctx, pipe)
        pipe.finish(ok=code == EXIT_OK)
    except BaseException as e:  # noqa: BLE001 - whatever happens, this process must not return into the runner
        traceback.print_exc()
        with contextlib.suppress(Exception):  # why, in one line, for the runner's FAILED line and retries
            if pipe is not None:
                pipe.send({"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]})
    finally:
        with contextlib.suppress(Exception):
            # what multiprocessing runs when its own children exit: finalizers that release the
            # semaphores a stage's libraries made (tqdm's lock) instead of leaking them; the
            # runner's atexit handlers, inherited by the fork, must not run here (hence _exit)
            multiprocessing.util._exit_function()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _call_stage(stage_def: StageDef, params: Any, inputs: Mapping[str, Any], ctx: Context, pipe: _PipeRun | _NullRun) -> int:
    label = ctx.job_label if ctx.world_size == 1 else f"{ctx.job_label} (rank {ctx.rank} of {ctx.world_size})"
    try:
        metadata = stage_def.fn(params, inputs, ctx) or {}
    except StageInterrupted as e:
        print(f"{label}: interrupted after a checkpoint ({e}); resubmit to resume", flush=True)
        return EXIT_INTERRUPTED
    except JobStopped as e:
        print(f"{label}: stopped by {e} without a checkpoint; nothing was committed", flush=True)
        return EXIT_ABORTED
    finally:
        with contextlib.suppress(Exception):  # the latest progress, for the log and progress.json
            ctx.reporter.flush()
    try:
        pipe.send({"result": {name: dict(value) for name, value in metadata.items()}})
    except (TypeError, ValueError, AttributeError) as e:
        print(
            f"{label}: the stage returned metadata that is not a JSON mapping per output ({e}); "
            "return {output name: {key: str, int, float, bool, None, list or dict}}",
            flush=True,
        )
        return EXIT_FAILED
    return EXIT_OK


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when the runner dies (Linux); where it already has,
    exit now instead of running an orphaned stage."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(EXIT_FAILED)
