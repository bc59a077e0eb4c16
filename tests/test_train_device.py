"""Stage train on its device: the GPU plan (autocast dtype, fused AdamW, pinned batches), and the sync-free
step giving the same training as the seed's loop, bit for bit, on the CPU.

The CUDA test runs only where torch sees a GPU (skipped here, saying so); the decision it checks is the
pure :func:`stages.device.training_plan`, tested on every machine.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from stagekit import FakeContext, make_input, run_stage  # noqa: E402
from test_mlm import TINY_CONFIG, make_dataset, make_tokenizer  # noqa: E402

from stages import mlm  # noqa: E402
from stages.device import TrainingPlan, device_training_plan, training_plan  # noqa: E402
from stages.formats.dataset import load_split  # noqa: E402
from stages.train import TRAIN, TrainParams, _optimizer  # noqa: E402
from stages.train_data import StepBatches, TrainOrder, step_loader, step_seed  # noqa: E402
from stages.train_run import TrainRun  # noqa: E402
from stages.train_step import LossMeter, train_step  # noqa: E402

NO_CUDA = "needs a CUDA GPU: checks the GPU paths (bf16/fp16 autocast, fused AdamW, pinned batches, no host sync)"


# ------------------------------------------------------------------------------------------ the plan


def test_training_plan_on_cuda_and_on_the_cpu() -> None:
    assert training_plan("auto", cuda=True, bf16_supported=True, fused_available=True) == TrainingPlan(
        mixed_precision="bf16", fused_adamw=True, pin_memory=True, stop_flag_on_host=True)
    older = training_plan("auto", cuda=True, bf16_supported=False, fused_available=True)
    assert older.mixed_precision == "fp16" and older.fused_adamw and older.pin_memory  # (fp16: with a GradScaler)
    assert not training_plan("auto", cuda=True, bf16_supported=True, fused_available=False).fused_adamw
    assert training_plan("fp16", cuda=True, bf16_supported=True, fused_available=True).mixed_precision == "fp16"
    assert training_plan("no", cuda=True, bf16_supported=True, fused_available=True).mixed_precision == "no"
    cpu = TrainingPlan(mixed_precision="no", fused_adamw=True, pin_memory=False, stop_flag_on_host=False)
    assert training_plan("auto", cuda=False, bf16_supported=False, fused_available=True) == cpu  # fp32, not pinned
    assert not training_plan("auto", cuda=False, bf16_supported=False, fused_available=False).fused_adamw
    assert training_plan("bf16", cuda=False, bf16_supported=False, fused_available=True).mixed_precision == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        training_plan("fp16", cuda=False, bf16_supported=False, fused_available=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's plan")
def test_the_cpu_plan_is_fp32_with_fused_adamw() -> None:
    """torch >= 2.4 has a fused AdamW for the CPU (HF Trainer's default optimizer there too)."""
    assert device_training_plan("auto") == TrainingPlan("no", fused_adamw=True, pin_memory=False, stop_flag_on_host=False)


# ------------------------------------------------------------------------------ the same training


def test_loss_at_given_positions_equals_mlm_loss_bit_for_bit(tmp_path: Path) -> None:
    tok_dir = make_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = mlm.build_model(TINY_CONFIG, tok_dir, 32).eval()
    ids = torch.randint(4, 60, (4, 32))
    labels = torch.full_like(ids, mlm.IGNORE_INDEX)
    picked = torch.rand(ids.shape) < 0.2
    labels[picked] = ids[picked]
    attention = torch.ones_like(ids)
    attention[1, 20:] = 0
    positions, targets = mlm.masked_positions(labels)
    for reduction in ("mean", "sum"):
        model.zero_grad()
        ref, n = mlm.mlm_loss(model, {"input_ids": ids, "attention_mask": attention, "labels": labels}, reduction)
        ref.backward()
        ref_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        got = mlm.mlm_loss_at(model, ids, attention, positions, targets, reduction)
        got.backward()
        assert n == len(positions) and torch.equal(got, ref), reduction
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), ref_grads, strict=True))
    none = torch.empty(0, dtype=torch.long)
    assert float(mlm.mlm_loss_at(model, ids, attention, none, none).detach()) == 0.0


def _seed_loop(model: Any, order: TrainOrder, collator: Any, tokenizer: Any, params: TrainParams, seed: int,
               steps: int) -> list[float]:
    """The loop of train version 2 (the seed's order of random draws), written out: the faithful reference,
    with the optimizer of ``device_training_plan`` (fused AdamW since version 3)."""
    from transformers import get_scheduler

    optimizer = _optimizer(model, params, fused=device_training_plan("auto").fused_adamw)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    special = torch.tensor(mlm.special_token_ids(tokenizer), dtype=torch.long)
    losses = []
    for step in range(steps):
        ids = torch.from_numpy(order.batch(step))
        torch.manual_seed(step_seed(seed, step))
        attention = (ids != tokenizer.pad_token_id).long()
        inputs, labels = collator.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, special))
        model.train()
        loss, _ = mlm.mlm_loss(model, {"input_ids": inputs, "attention_mask": attention, "labels": labels})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _stage_steps(model: Any, order: TrainOrder, collator: Any, tokenizer: Any, params: TrainParams, seed: int,
                 steps: int, ckpt: Path) -> float:
    """The stage's own objects and step (StepBatches, step_loader, train_step, LossMeter) on the CPU plan."""
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]
    from transformers import get_scheduler

    plan = device_training_plan("auto")
    try:
        acc = Accelerator(mixed_precision=plan.mixed_precision)
        optimizer = _optimizer(model, params, fused=plan.fused_adamw)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
        run = TrainRun(acc, *acc.prepare(model, optimizer, scheduler), params, ckpt, non_blocking=plan.pin_memory)
        batches = StepBatches(order, collator, mlm.special_token_ids(tokenizer), tokenizer.pad_token_id, seed)
        meter = LossMeter(0.0, acc.device, 1)
        for step, batch in zip(range(steps), step_loader(batches, 0, steps, plan.pin_memory), strict=True):
            meter.add(train_step(run, batch, step, seed))
        return meter.read()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU trajectory (on CUDA the plan changes it on purpose)")
def test_the_stage_step_trains_exactly_as_the_seed_loop(tmp_path: Path) -> None:
    """Same weights bit for bit after 6 steps with dropout, rows with and without padding, and the same loss sum."""
    from transformers import DataCollatorForLanguageModeling

    tok_dir = make_tokenizer(tmp_path / "tok")
    tokenizer = mlm.load_tokenizer(tok_dir)
    rows = load_split(make_dataset(tmp_path / "ds", langs=("aa",), n_train=24, n_test=2), "aa", "train").copy()
    rows[::5, 25:] = tokenizer.pad_token_id  # some batches have padding (a mask), others none (no mask)
    order = TrainOrder([rows], batch_size=4, seed=3)
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
    params = TrainParams(config=TINY_CONFIG, lr=1e-2)
    torch.manual_seed(5)
    model = mlm.build_model(TINY_CONFIG, tok_dir, 32)
    twin = copy.deepcopy(model)
    losses = _seed_loop(model, order, collator, tokenizer, params, seed=9, steps=6)
    total = _stage_steps(twin, order, collator, tokenizer, params, seed=9, steps=6, ckpt=tmp_path / "ckpt")
    assert total == sum(losses)  # summed on the device in float64, in step order: the host's sum exactly
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(model.state_dict()["lm_head.bias"], torch.zeros_like(model.state_dict()["lm_head.bias"]))


# ------------------------------------------------------------------------------------------ on CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_on_cuda_the_stage_takes_the_gpu_paths_without_host_syncs(tmp_path: Path) -> None:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]
    from transformers import DataCollatorForLanguageModeling, get_scheduler

    plan = device_training_plan("auto")
    assert plan.mixed_precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert plan.fused_adamw and plan.pin_memory and plan.stop_flag_on_host
    tok_dir = make_tokenizer(tmp_path / "tok")
    tokenizer = mlm.load_tokenizer(tok_dir)
    rows = np.asarray(load_split(make_dataset(tmp_path / "ds", langs=("aa",), n_train=24, n_test=2), "aa", "train"))
    order = TrainOrder([rows], batch_size=4, seed=3)
    params = TrainParams(config=TINY_CONFIG, lr=1e-3)
    torch.manual_seed(5)
    model = mlm.build_model(TINY_CONFIG, tok_dir, 32)
    try:
        acc = Accelerator(mixed_precision=plan.mixed_precision)
        optimizer = _optimizer(model, params, fused=plan.fused_adamw)
        assert optimizer.defaults["fused"] is True
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=6)
        run = TrainRun(acc, *acc.prepare(model, optimizer, scheduler), params, tmp_path, non_blocking=plan.pin_memory)
        batches = StepBatches(order, DataCollatorForLanguageModeling(tokenizer=tokenizer), mlm.special_token_ids(tokenizer),
                              tokenizer.pad_token_id, 9)
        loader = iter(step_loader(batches, 0, 6, plan.pin_memory))
        meter = LossMeter(0.0, acc.device, 1)
        meter.add(train_step(run, next(loader), 0, 9))  # (the first step sets things up: lazy inits may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync from here raises
        try:
            for step in range(1, 6):
                batch = next(loader)
                assert batch["input_ids"].is_pinned() and batch["positions"].is_pinned()
                meter.add(train_step(run, batch, step, 9))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert np.isfinite(meter.read())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    # and the stage end to end: the chosen precision in its metadata
    ctx = FakeContext(tmp_path / "run", seed=11, gpus=1)
    inputs = {"dataset": make_input(tmp_path / "ds", "dataset"), "tokenizer": make_input(tok_dir, "tokenizer")}
    meta = run_stage(TRAIN, {"config": TINY_CONFIG, "max_steps": 4, "batch_size": 4, "checkpoint_every": None}, ctx, inputs)
    assert meta is not None and meta["model"]["mixed_precision"] == plan.mixed_precision
