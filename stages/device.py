"""The device a stage's model runs on: checked against the GPUs the job asked for, named in the job log.

Every stage that puts a model on a device goes through :func:`pick_device` (or, where accelerate
chooses the device, :func:`check_gpus` before and :func:`announce` after), so that

- a job that asked for GPUs (``ctx.gpus``) on a node where torch sees no CUDA fails at once, saying
  why (typically a CPU build of torch in the job's environment) instead of running for hours on the CPU;
- the job log says which device it used: ``device: cuda:0 (NVIDIA H100 80GB HBM3), 1 of 1 visible``
  or ``device: cpu (2 threads)``.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

DeviceChoice = Literal["auto", "cpu", "cuda"]


def gpus_text(n: int) -> str:
    return f"{n} GPU" + ("" if n == 1 else "s")


def cuda_missing_message(gpus: int, stage: str, host: str, torch_version: str, cuda_build: bool, visible: str | None) -> str:
    """The one-line error for a job that asked for GPUs where torch has no CUDA."""
    why = f"torch {torch_version} is a CPU-only build"
    if cuda_build:
        why = f"torch {torch_version} sees no GPU" + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
    return (
        f"job asked for {gpus_text(gpus)} but CUDA is not available on {host} ({why}): install a CUDA build of torch "
        f"(see README, Running on a cluster) or set executor.resources.{stage}.gpus: 0"
    )


def stage_of(job_label: str) -> str:
    """The stage id of a job label: ``prune[language=en]`` -> ``prune``."""
    return job_label.split("[", 1)[0] or "<stage>"


def check_gpus(gpus: int, job_label: str) -> None:
    """Raise RuntimeError when the job asked for GPUs and torch cannot use CUDA here."""
    import torch

    if gpus > 0 and not torch.cuda.is_available():
        raise RuntimeError(
            cuda_missing_message(
                gpus,
                stage_of(job_label),
                socket.gethostname(),
                torch.__version__,
                torch.version.cuda is not None,
                os.environ.get("CUDA_VISIBLE_DEVICES"),
            )
        )


def device_line(device: Any) -> str:
    """``device: cuda:0 (NVIDIA H100 80GB HBM3), 1 of 1 visible`` or ``device: cpu (2 threads)``."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        return f"device: cuda:{index} ({name}), 1 of {torch.cuda.device_count()} visible"
    return f"device: {device} ({torch.get_num_threads()} threads)"


def announce(device: Any) -> None:
    """Name the device in the job log (stdout)."""
    print(device_line(device), flush=True)


def pick_device(gpus: int, job_label: str, choice: DeviceChoice = "auto") -> Any:
    """The ``torch.device`` to run on: CUDA when available (``auto``) or asked for (``cuda``), else the
    CPU; checked against the job's GPUs (unless ``cpu`` is asked for) and announced in the job log."""
    import torch

    if choice != "cpu":
        check_gpus(gpus, job_label)
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device=cuda but CUDA is not available on {socket.gethostname()}; use device: auto or cpu")
    use_cuda = choice != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    announce(device)
    return device
