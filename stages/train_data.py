"""The order and masks of the training data: a pure function of the seed and the step.

The training set is the concatenation of every language's train chunks; epoch ``e`` visits it in the
permutation seeded by ``(seed, e)`` and step ``s`` takes slice ``s mod steps_per_epoch`` of epoch
``s // steps_per_epoch`` (:class:`TrainOrder`), so a resumed run needs no data-loader state. The torch
seed of each step (masks and dropout) is :func:`step_seed`; with several processes each rank trains on
its contiguous share of the step's rows (:func:`shard_rows`). :class:`StepBatches` makes each step's masked
batch and :func:`step_loader` serves them (pinned on CUDA). torch is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast


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


class StepBatches:
    """The masked batch of each step, indexed by the step (a map-style dataset for ``torch.utils.data.DataLoader``).

    Item ``step``: :meth:`TrainOrder.batch`, masked by transformers' collator right after
    ``torch.manual_seed(step_seed(seed, step))`` (the order of random draws of the seed's loop), then this
    rank's rows (:func:`shard_rows`; with several processes). A dict of host tensors: ``input_ids``,
    ``attention_mask`` (None when no row has padding), ``positions``/``targets``
    (:func:`stages.mlm.masked_positions`: the flat masked positions of the rows and their ids), ``masked``
    (masked tokens of the whole step) and ``weight`` (0 for the stand-in row of a rank without rows of a
    short last batch, else 1)."""

    def __init__(self, order: TrainOrder, collator: Any, special_ids: Sequence[int], pad_id: int | None, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        import torch

        self.order, self.collator, self.pad_id = order, collator, pad_id
        self.special = torch.tensor(list(special_ids), dtype=torch.long)
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __len__(self) -> int:
        return 2**62  # any step (the loader's sampler says which)

    def __getitem__(self, step: int) -> dict[str, Any]:
        import torch

        from stages import mlm

        ids = torch.from_numpy(self.order.batch(step))
        torch.manual_seed(step_seed(self.seed, step))
        attention: Any = (ids != self.pad_id).long() if self.pad_id is not None else torch.ones_like(ids)
        inputs, labels = self.collator.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, self.special))
        masked, weight = int((labels != mlm.IGNORE_INDEX).sum()), 1.0  # (host tensors: no device sync)
        if self.world_size > 1:  # this rank's rows of the whole step's batch and masks
            start, stop = shard_rows(len(ids), self.rank, self.world_size)
            if start == stop:  # no rows for this rank (a short last batch): one row, weighted 0, keeps DDP in step
                start, stop, weight = 0, 1, 0.0
            inputs, attention, labels = inputs[start:stop], attention[start:stop], labels[start:stop]
        if not bool((attention == 0).any()):  # no padding: transformers skips an all-ones mask anyway, after
            attention = None  # reading it back from the device (``mask.all()``); None takes that path directly
        positions, targets = mlm.masked_positions(labels)
        return {"input_ids": inputs, "attention_mask": attention, "positions": positions, "targets": targets,
                "masked": masked, "weight": weight}


def step_loader(batches: StepBatches, start: int, stop: int, pin_memory: bool) -> Any:
    """A ``DataLoader`` of the batches of steps ``start .. stop - 1`` in order, in this process (each item seeds
    torch's global RNG, which the step's dropout then draws from on the CPU), pinned when ``pin_memory``
    (CUDA: the copies to the GPU are then ``non_blocking``)."""
    from torch.utils.data import DataLoader

    return DataLoader(cast(Any, batches), batch_size=None, sampler=range(start, stop), num_workers=0, pin_memory=pin_memory)
