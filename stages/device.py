"""The device a stage's model runs on: checked against the GPUs the job asked for, named in the job log.

Every stage that puts a model on a device goes through :func:`pick_device` (or, where accelerate
chooses the device, :func:`check_gpus` before and :func:`announce` after), so that

- a job that asked for GPUs (``ctx.gpus``) on a node where torch sees no CUDA fails at once, saying
  why (typically a CPU build of torch in the job's environment) instead of running for hours on the CPU;
- the job log says which device it used: ``device: cuda:0 (NVIDIA H100 80GB HBM3), 1 of 1 visible``
  or ``device: cpu (2 threads)``.

A training loop asks :func:`device_training_plan` how to use the device (:class:`TrainingPlan`: the
autocast dtype, fused AdamW, pinned batches, where stop flags are agreed); the decision itself is the pure
:func:`training_plan`, so that it is tested on machines without a GPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
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


MixedPrecision = Literal["no", "fp16", "bf16", "auto"]


@dataclass(frozen=True)
class TrainingPlan:
    """How a training loop uses its device (:func:`training_plan`).

    ``mixed_precision``: the autocast dtype ("no", "bf16", "fp16"; fp16 comes with a GradScaler);
    ``fused_adamw``: ``torch.optim.AdamW(fused=True)`` (one kernel per step; HF Trainer's default optimizer
    since torch 2.8, on the CPU too, where it is ~10x faster than the per-tensor loop); ``pin_memory``:
    batches are put in pinned host memory and copied with ``non_blocking=True``; ``stop_flag_on_host``:
    with several processes, stop requests are agreed over a gloo group on host tensors, so that reading
    the flag never waits for the GPU.
    """

    mixed_precision: Literal["no", "fp16", "bf16"]
    fused_adamw: bool
    pin_memory: bool
    stop_flag_on_host: bool


def training_plan(requested: MixedPrecision, cuda: bool, bf16_supported: bool, fused_available: bool) -> TrainingPlan:
    """The device settings of a training loop, a pure function of what the device offers.

    ``fused_available``: torch has a fused AdamW kernel for the device (CUDA and, since torch 2.4, the CPU).
    On CUDA: ``auto`` is bf16 where the GPU supports it, else fp16 (with a GradScaler); batches are pinned
    and stop flags agreed on the host. On the CPU: ``auto`` is fp32 ("no"), nothing is pinned. AdamW is
    fused wherever torch offers it. fp16 without CUDA is refused."""
    if requested == "fp16" and not cuda:
        raise ValueError("mixed_precision=fp16 needs a CUDA GPU; use 'auto', 'no' or 'bf16'")
    auto: Literal["no", "fp16", "bf16"] = ("bf16" if bf16_supported else "fp16") if cuda else "no"
    mixed = auto if requested == "auto" else requested
    return TrainingPlan(mixed_precision=mixed, fused_adamw=fused_available, pin_memory=cuda,
                        stop_flag_on_host=cuda)


def device_training_plan(requested: MixedPrecision) -> TrainingPlan:
    """:func:`training_plan` for this process's torch: CUDA, bf16 support, and a fused AdamW for the device."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused = ("cuda" if cuda else "cpu") in _get_fused_kernels_supported_devices()
    except ImportError:  # (a torch without fused optimizers)
        fused = False
    return training_plan(requested, cuda, bf16, fused)
