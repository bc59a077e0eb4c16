"""The order of the training data: a pure function of the seed and the step (no torch).

The training set is the concatenation of every language's train chunks; epoch ``e`` visits it in the
permutation seeded by ``(seed, e)`` and step ``s`` takes slice ``s mod steps_per_epoch`` of epoch
``s // steps_per_epoch`` (:class:`TrainOrder`), so a resumed run needs no data-loader state. The torch
seed of each step (masks and dropout) is :func:`step_seed`; with several processes each rank trains on
its contiguous share of the step's rows (:func:`shard_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class TrainOrder:
    """Step-indexed order of the concatenated training chunks of every language.

    Epoch ``e`` visits the chunks in the permutation seeded by ``(seed, e)``; step ``s`` is slice
    ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the last batch of an epoch may be
    smaller, as with ``drop_last=False``).
    """

    def __init__(self, arrays: Sequence[Any], batch_size: int, seed: int) -> None:
        import numpy as np

        if not arrays:
            raise ValueError("no training data")
        widths = {int(a.shape[1]) for a in arrays}
        if len(widths) != 1:
            raise ValueError(f"languages have different block sizes {sorted(widths)}")
        self.arrays = list(arrays)
        self.block_size = widths.pop()
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.size = int(self.offsets[-1])
        if self.size == 0:
            raise ValueError("the training splits are empty")
        self.batch_size = batch_size
        self.seed = int(seed) % 2**32
        self.steps_per_epoch = math.ceil(self.size / batch_size)
        self._epoch: int | None = None
        self._perm: Any = None

    def permutation(self, epoch: int) -> Any:
        import numpy as np

        if self._epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> Any:
        """Global chunk indices of ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> Any:
        """The token ids of ``step``'s chunks, int64 ``[batch, block_size]``."""
        import numpy as np

        idx = self.indices(step)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        rows = [self.arrays[w][i - self.offsets[w]] for w, i in zip(which, idx, strict=True)]
        return np.stack(rows).astype(np.int64)


def step_seed(seed: int, step: int, rank: int | None = None) -> int:
    """The torch seed of training step ``step`` (masks and dropout); with ``rank``: the dropout seed
    of that rank's share of the step (several processes)."""
    import numpy as np

    words = [int(seed) % 2**32, 1, step] if rank is None else [int(seed) % 2**32, 2, step, rank]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] % 2**63)


def shard_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` of a step's batch that ``rank`` trains on (the first
    ``rows % world_size`` ranks get one more, as ``numpy.array_split``; a rank may get none)."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
