"""One training run's objects and state, and its checkpoints on disk (``<checkpoint_dir>/train_state/``, ``best/``).

:class:`TrainState` is what a checkpoint records besides the tensors (step, evaluation history, best so
far); :class:`TrainRun` holds the accelerator, model, optimizer and scheduler, writes and restores
``train_state/`` (model, optimizer, scheduler, scaler and RNG states, ``state.json``) and ``best/``
(``save_pretrained`` of the best model so far), and agrees stop requests among ranks. A directory is
replaced atomically (:func:`replace_dir`): a complete previous copy survives a crash, and
:func:`existing_dir` finds it.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages._io import write_json

if TYPE_CHECKING:
    from stages.train import TrainParams

CHECKPOINT_FORMAT = "cross-lingual-subnets/train-checkpoint/2"  # 2: history records both test halves

STATE_DIR = "train_state"

BEST_DIR = "best"


@dataclass
class TrainState:
    """What a checkpoint records besides the tensors."""

    step: int = 0
    total_steps: int = 0
    seed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    best_step: int | None = None
    best_loss: float | None = None  # the selection-half mean loss of best_step
    last_eval_step: int = -1
    loss_sum: float = 0.0  # training loss since the last log line
    loss_count: int = 0

    def eval_at(self, step: int) -> dict[str, Any] | None:
        for rec in self.history:
            if rec["step"] == step:
                return rec
        return None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing it, so that a complete copy exists at every moment."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def existing_dir(path: Path) -> Path | None:
    """``path``, or its ``.old`` copy when a replacement was interrupted half-way."""
    if path.is_dir():
        return path
    old = path.with_name(path.name + ".old")
    return old if old.is_dir() else None


def _rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class TrainRun:
    """The objects of one training run (built by :func:`train_stage`)."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    params: TrainParams
    ckpt_dir: Path
    non_blocking: bool = False  # batches come pinned: copy them to the device asynchronously (CUDA)
    stop_on_host: bool = False  # agree stop requests over a gloo group on host tensors (CUDA, several processes)
    _stop_group: Any = field(default=None, repr=False)

    @property
    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0; the only one without several processes)."""
        return bool(self.accelerator.is_main_process)

    def checkpoint(self, state: TrainState, reason: str) -> Path:
        """Rank 0 writes ``train_state/``; every rank waits until it has."""
        path = self.save_checkpoint(state, reason) if self.main else self.ckpt_dir / STATE_DIR
        self.accelerator.wait_for_everyone()
        return path

    def stop_agreed(self, requested: bool) -> bool:
        """``requested`` on any rank (one all-reduce; every rank must call this equally often), so
        that all ranks stop at the same point; with one process, ``requested`` itself. With
        ``stop_on_host`` the flag goes through a gloo group of host tensors: reading it never waits
        for the GPU's queued work."""
        if self.accelerator.num_processes == 1:
            return requested
        import torch
        import torch.distributed as dist

        if self.stop_on_host and self._stop_group is None:  # (every rank gets here at the same call)
            self._stop_group = dist.new_group(backend="gloo")
        device = "cpu" if self.stop_on_host else self.accelerator.device  # a GPU flag would wait for the GPU
        flag = torch.tensor([1.0 if requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
        return bool(flag.item() > 0)

    def save_checkpoint(self, state: TrainState, reason: str) -> Path:
        """Write ``train_state/`` atomically (a complete previous copy survives a crash)."""
        import torch

        final = self.ckpt_dir / STATE_DIR
        tmp = self.ckpt_dir / (STATE_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self.unwrapped.state_dict(), tmp / "model.pt")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(_rng_states(), tmp / "rng.pt")
        write_json(tmp / "state.json", {
            "format": CHECKPOINT_FORMAT,
            "reason": reason,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "params": self.params.model_dump(mode="json"),
            "state": asdict(state),
            "files": {"model": "model.pt (state_dict)", "optimizer": "optimizer.pt", "scheduler": "scheduler.pt",
                      "scaler": "scaler.pt (fp16 only)", "rng": "rng.pt (torch/numpy/python/cuda states)"},
        })
        replace_dir(tmp, final)
        return final

    def load_checkpoint(self, path: Path, expected: TrainState) -> TrainState:
        """Restore tensors and state from ``path``; refuse a checkpoint of another run."""
        import torch

        info = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if info.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a train checkpoint of this version ({info.get('format')!r})")
        state = TrainState(**info["state"])
        if (state.total_steps, state.seed) != (expected.total_steps, expected.seed):
            raise ValueError(
                f"{path}: checkpoint of a run with {state.total_steps} steps and seed {state.seed}, this run has "
                f"{expected.total_steps} steps and seed {expected.seed}; delete it to start over"
            )
        device = self.accelerator.device
        if device.type == "cpu":  # accelerate's CPU ranks run on "cpu:<n>", which torch.load cannot map to
            device = torch.device("cpu")
        self.unwrapped.load_state_dict(torch.load(path / "model.pt", map_location=device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(path / "scaler.pt"))
        _set_rng_states(torch.load(path / "rng.pt", weights_only=False))
        return state

    def save_best(self) -> None:
        tmp = self.ckpt_dir / (BEST_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.unwrapped.save_pretrained(str(tmp))
        replace_dir(tmp, self.ckpt_dir / BEST_DIR)
