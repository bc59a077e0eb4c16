"""One optimizer step of stage ``train``, queued on its device without waiting for it.

A step takes a batch of :class:`stages.train_data.StepBatches` (host tensors, pinned on CUDA), copies it to
the device (``non_blocking`` when pinned), computes the loss at the masked positions given
(:func:`stages.mlm.mlm_loss_at`: no count or boolean index read back from the device), and steps the
optimizer and the schedule. Nothing in it reads a device value on the host: the training loss stays on the
device in a :class:`LossMeter` until a log line or a checkpoint needs it. With several processes each rank
trains on its rows, the loss scaled so that the gradient is the whole batch's, and the step's loss is
all-reduced on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stages.train_data import step_seed

if TYPE_CHECKING:
    from stages.train_run import TrainRun, TrainState

DEVICE_KEYS = ("input_ids", "attention_mask", "positions", "targets")


def to_device(batch: Mapping[str, Any], device: Any, non_blocking: bool) -> dict[str, Any]:
    """The tensors a step needs, on ``device`` (asynchronous copies from pinned memory when ``non_blocking``)."""
    return {k: None if batch[k] is None else batch[k].to(device, non_blocking=non_blocking) for k in DEVICE_KEYS}


def train_step(trainer: TrainRun, batch: Mapping[str, Any], step: int, seed: int) -> Any:
    """One optimizer step on ``batch`` (step ``step``); returns the step's loss as a detached device tensor
    (with several processes: the sum over ranks of their weighted shares; divide by the ranks)."""
    import torch

    from stages import mlm

    acc = trainer.accelerator
    world = acc.num_processes
    if world > 1:  # this rank's dropout
        torch.manual_seed(step_seed(seed, step, acc.process_index))
    moved = to_device(batch, acc.device, trainer.non_blocking)
    args = (moved["input_ids"], moved["attention_mask"], moved["positions"], moved["targets"])
    trainer.model.train()
    with acc.autocast():
        if world == 1:
            loss = mlm.mlm_loss_at(trainer.model, *args)
        else:  # sum over this rank's masked tokens / the step's, times the ranks (DDP averages gradients)
            loss_sum = mlm.mlm_loss_at(trainer.model, *args, reduction="sum")
            loss = loss_sum * (float(batch["weight"]) * world / max(int(batch["masked"]), 1))
    acc.backward(loss)
    if trainer.params.max_grad_norm is not None:
        acc.clip_grad_norm_(trainer.model.parameters(), trainer.params.max_grad_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if world > 1:  # the whole step's loss: the sum over ranks of their shares as weighted above
        import torch.distributed as dist

        total = loss.detach().clone()
        dist.all_reduce(total)
        return total
    return loss.detach()


class LossMeter:
    """The sum of the training losses since the last log line, kept on the device (float64, added in step
    order: the same number as summing them on the host, without reading each step's loss back)."""

    def __init__(self, start: float, device: Any, ranks: int) -> None:
        import torch

        self.total = torch.tensor(start, dtype=torch.float64, device=device)
        self.ranks = ranks

    def add(self, loss: Any) -> None:
        """Add one step's loss (:func:`train_step`'s; divided by the ranks with several processes)."""
        self.total += loss.double() / self.ranks if self.ranks > 1 else loss.double()

    def read(self) -> float:
        """The sum so far (a host sync: at log lines and checkpoints only)."""
        return float(self.total)

    def sync_state(self, state: TrainState) -> None:
        """Write the sum into ``state.loss_sum`` (before a checkpoint records it)."""
        state.loss_sum = self.read()

    def reset(self) -> None:
        self.total.zero_()
