"""The store's I/O thread pool: how many threads, how files are grouped into pool tasks, and
running a function over items that stops at the first error (ingest and verified views share it)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

# hashlib and file I/O release the GIL, so files are hashed side by side, one thread per CPU this
# process may use (a SLURM job may get 2 of a node's 64): hashing is CPU-bound, and on 2 CPUs 4
# threads measured 25% (large files) to 70% (small ones: GIL hand-offs at every syscall) slower.
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
IO_THREADS = min(8, _CPUS)
# A pool task costs 20-40 us of its own, as much as logging a small file: small files go in batches.
BATCH_BYTES = 8 << 20
BATCH_FILES = 64
_T = TypeVar("_T")
_R = TypeVar("_R")


def map_all(pool: ThreadPoolExecutor, fn: Callable[[_T], _R], items: Sequence[_T]) -> tuple[list[_R], BaseException | None]:
    """``fn`` over ``items`` on ``pool``: (the results that succeeded, in order, and the first error).
    Stops starting new calls at the first error; the caller cleans up after the successful ones."""
    futures: list[Future[_R]] = [pool.submit(fn, item) for item in items]
    wait(futures, return_when=FIRST_EXCEPTION)
    for f in futures:
        f.cancel()
    wait(futures)
    done = [f.result() for f in futures if not f.cancelled() and f.exception() is None]
    error = next((e for f in futures if not f.cancelled() and (e := f.exception()) is not None), None)
    return done, error


def batches(sizes: Sequence[int]) -> list[list[int]]:
    """Indexes into ``sizes`` grouped into pool tasks of about ``BATCH_BYTES`` or ``BATCH_FILES``,
    largest files first, so that a big file never runs alone at the end while the others wait."""
    groups: list[list[int]] = []
    batch: list[int] = []
    nbytes = 0
    for k in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
        batch.append(k)
        nbytes += sizes[k]
        if nbytes >= BATCH_BYTES or len(batch) >= BATCH_FILES:
            groups.append(batch)
            batch, nbytes = [], 0
    return groups + [batch] if batch else groups
