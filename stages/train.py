"""Stage ``train``: masked-LM fine-tuning (or pre-training of a tiny model) on every language at once.

The recipe of the original study (docs/methods.md section 4), as HF ``Trainer`` ran it:

- training set: the shuffled concatenation of every language's train chunks; the order of epoch
  ``e`` is a permutation seeded by ``(seed, e)`` and step ``s`` takes its ``s``-th slice, so the
  data order is a pure function of the step (resumable without state);
- masking: transformers' ``DataCollatorForLanguageModeling`` (15%, 80/10/10), fresh each step;
  torch's RNG is reseeded from ``(seed, step)`` before each step, so masks and dropout are also a
  pure function of the step;
- AdamW (betas 0.9/0.999, eps 1e-8; no weight decay on biases and LayerNorm weights, as ``Trainer``),
  linear decay with ``warmup_steps`` (0), gradient clipping at ``max_grad_norm`` (1.0), batch 8,
  lr 2e-5, weight decay 0.01, one epoch, via ``accelerate.Accelerator``; AdamW fused where torch has the
  kernel (CPU and CUDA, as Trainer's default ``adamw_torch_fused``); on CUDA (``stages.device.training_plan``,
  ``mixed_precision="auto"``): bf16 autocast where the GPU supports it (the seed's fp16 with a GradScaler
  otherwise, or when asked), pinned batches copied asynchronously, and no per-step host sync
  (:mod:`stages.train_step`); fp32 on the CPU;
- evaluation per language with **deterministic** masks (``stages.mlm``; seed ``eval_seed``, the
  same for every stage that measures perplexity) before training, every ``eval_every`` steps and at
  the end, on **both halves** of the test documents (``stages.dataset``): the *selection* half
  (split ``select``) and the *reporting* half (split ``report``);
- the output is the **best** model by mean per-language loss **on the selection half** among the
  evaluations after step 0 (``load_best_model_at_end``); the reporting half never enters a decision;
- ``metrics.json`` reports the **reporting half**: per-language loss/perplexity (with a percentile
  bootstrap interval over eval chunks) before training, of the chosen model ("after") and of the
  final step. The selection half's numbers are kept under ``select_*`` keys.

``metrics.json``::

    languages, steps, best_step, steps_per_epoch, train_chunks
    eval_split        "report": the half of before/after/final, mean_loss_* and history[*].languages
    selection_split   "select": the half of select_* and history[*].select(_mean_loss), the criterion
    best_criterion    a sentence saying how best_step was chosen
    before / after / final    {lang: {"loss", "perplexity", "perplexity_interval": [lo, hi], "tokens"}}
    mean_loss_before / mean_loss_after       mean over languages of the reporting-half loss
    select_before / select_after / select_final, select_mean_loss_before / select_mean_loss_after
    interval          {"method", "level", "resamples", "seed"}: how perplexity_interval was computed
    history           [{"step", "mean_loss", "languages" (report), "select_mean_loss", "select"}, ...]

Logged: ``eval/<lang>/{loss,perplexity}`` and ``eval/mean_loss`` (reporting half),
``eval_select/<lang>/{loss,perplexity}`` and ``eval_select/mean_loss`` (selection half).

Preemption: ``ctx.stop_requested`` is polled before every step and between evaluation batches.
When set, the stage writes ``<checkpoint_dir>/train_state/`` (model and optimizer/scheduler/scaler
state, RNG states, ``state.json`` with the step, evaluation history and best so far) and raises
``StageInterrupted``; the next attempt resumes from it and ends with the same weights and metrics
as an uninterrupted run. The same checkpoint is also written every ``checkpoint_every`` steps.
The best model so far lives in ``<checkpoint_dir>/best/``.

Output ``model`` (type ``model``): ``save_pretrained`` files of the chosen model, the tokenizer
files, and ``metrics.json``.

Several processes (``executor.resources.train.processes`` > 1; one per GPU by default when the job
asks for several): data-parallel training (DDP through accelerate: NCCL on GPUs, gloo on CPUs),
with the same recipe and the same **global** batch of ``batch_size`` chunks per step:

- every rank builds the model from the same seed (DDP also broadcasts rank 0's weights) and
  resumes from the same checkpoint;
- every rank draws the whole step's batch and masks (same seed), then trains on its contiguous
  share of the rows; the loss is the sum over its masked tokens divided by the step's masked
  tokens (times the ranks, which DDP's gradient averaging undoes), so the gradient is the one of
  the whole batch. Without dropout the run equals the one-process run up to float rounding;
  dropout draws differ per rank (``step_seed`` with the rank), so with dropout it does not;
- ``train/loss`` is the whole step's loss (all-reduced), logged by rank 0 (the engine drops the
  other ranks' metrics); the lr schedule steps once per step (``split_batches``);
- every rank evaluates the full test halves (same weights, same deterministic masks: the same
  numbers, at no extra wall time over rank 0 alone, and no rank waits in a collective meanwhile);
- stop requests are agreed among ranks (an all-reduce before each step and each evaluation batch),
  so that all stop at the same step; rank 0 writes checkpoints and the best model, the others wait
  for it; rank 0 alone writes the output.

This module holds the parameters, the setup and the outputs; the data order is
:mod:`stages.train_data`'s, the run's state and checkpoints :mod:`stages.train_run`'s, the loop
:mod:`stages.train_loop`'s.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageInterrupted, StageParams, stage
from stages._io import get_input, optional_input, write_json
from stages.formats.dataset import REPORT, SELECT, dataset_languages, read_dataset_meta, split_blocks
from stages.formats.metrics import MODEL_METRICS_JSON
from stages.train_data import TrainOrder
from stages.train_loop import run_loop
from stages.train_run import BEST_DIR, STATE_DIR, TrainRun, TrainState, existing_dir

BEST_CRITERION = (
    "the evaluation after step 0 with the lowest mean over languages of the selection-half (select) eval loss; "
    "the reporting half (report) never enters the choice"
)


class TrainParams(StageParams):
    """Parameters of the ``train`` stage (defaults: the original study)."""

    pretrained: str | None = Field(
        None,
        description="Hub name or local directory of the masked LM to fine-tune (e.g. FacebookAI/xlm-roberta-base).",
    )
    config: dict[str, Any] | None = Field(
        None, description="XLMRobertaConfig fields of a model trained from scratch (tiny models); vocabulary and "
        "special ids come from the tokenizer. Exactly one of pretrained/config ({} counts as unset)."
    )
    epochs: int = Field(1, ge=1, description="Passes over the training set (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps in total; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Training chunks per step.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases/LayerNorm).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the linear decay to 0.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (None: no clipping).")
    eval_batch_size: int = Field(8, ge=1, description="Chunks per evaluation batch.")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked (train and eval).")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        "auto", description="auto: bf16 on CUDA GPUs that support it, else fp16 on CUDA; no (fp32) on CPU."
    )
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate every this many steps (always before training and at the end)."
    )
    checkpoint_every: int | None = Field(
        1000, ge=1, description="Write a resumable checkpoint every this many steps (also on stop requests)."
    )
    max_eval_chunks: int | None = Field(
        None, ge=1, description="Evaluate on at most this many chunks of each test half per language."
    )
    eval_seed: int = Field(1234, description="Seed of the deterministic evaluation masks (shared by every stage).")
    bootstrap_resamples: int = Field(
        1000, ge=10, description="Bootstrap resamples of the eval chunks for the reported perplexity intervals."
    )
    interval_level: float = Field(0.95, gt=0.0, lt=1.0, description="Coverage of the perplexity intervals.")
    log_every: int = Field(10, ge=1, description="Log the mean training loss and the lr every this many steps.")
    keep_checkpoint: bool = Field(
        True, description="Keep the training checkpoint after success (False: delete it to free disk)."
    )

    @model_validator(mode="after")
    def _one_model_source(self) -> TrainParams:
        if self.pretrained is not None and self.config:
            raise ValueError("set only one of 'pretrained' (a checkpoint) and 'config' (a model from scratch)")
        return self


def model_source(params: TrainParams, base: Path | None) -> str | Path | dict[str, Any]:
    """Where the model to train comes from: exactly one of the ``base`` input (a model artifact of
    this study, e.g. a pre-trained tiny model), ``pretrained`` and ``config``."""
    sources = [s for s in (base, params.pretrained, params.config or None) if s is not None]
    if len(sources) != 1:
        raise ValueError(
            "train needs exactly one model source: connect a 'base' model input, or set params.pretrained "
            f"(a checkpoint) or params.config (a model from scratch); got {len(sources)}"
        )
    return sources[0]


def _optimizer(model: Any, params: TrainParams, fused: bool = False) -> Any:
    """AdamW with Trainer's parameter groups (no decay on biases and LayerNorm parameters); ``fused``: one
    fused kernel for the update (``fused=True``, where torch has one: :func:`stages.device.training_plan`)."""
    import torch

    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay: list[Any] = []
    plain: list[Any] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (plain if id(p) in no_decay or "bias" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": params.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.999), eps=1e-8, **extra)


def _build_model(source: str | Path | dict[str, Any], tokenizer_dir: Path, block_size: int, seed: int) -> Any:
    import torch

    from stages import mlm

    torch.manual_seed(int(seed) % 2**63)
    if isinstance(source, dict):
        return mlm.build_model(source, tokenizer_dir, block_size)
    return mlm.load_model(str(source))


def _write_outputs(trainer: TrainRun, state: TrainState, tokenizer: Any, languages: list[str],
                   order: TrainOrder, out: Path) -> dict[str, Any]:
    before = state.eval_at(0)
    best = state.eval_at(state.best_step) if state.best_step is not None else None
    final = state.eval_at(state.total_steps)
    if before is None or best is None or final is None:
        raise RuntimeError("train: evaluation history is incomplete")
    best_dir = existing_dir(trainer.ckpt_dir / BEST_DIR)
    if best_dir is None:
        raise RuntimeError(f"train: the best model is missing from {trainer.ckpt_dir}")
    for f in sorted(best_dir.iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)
    tokenizer.save_pretrained(str(out))
    p = trainer.params
    metrics = {
        "languages": languages,
        "steps": state.total_steps,
        "best_step": state.best_step,
        "steps_per_epoch": order.steps_per_epoch,
        "train_chunks": order.size,
        "eval_split": REPORT,
        "selection_split": SELECT,
        "best_criterion": BEST_CRITERION,
        "before": before["languages"],
        "after": best["languages"],
        "final": final["languages"],
        "mean_loss_before": before["mean_loss"],
        "mean_loss_after": best["mean_loss"],
        "select_before": before["select"],
        "select_after": best["select"],
        "select_final": final["select"],
        "select_mean_loss_before": before["select_mean_loss"],
        "select_mean_loss_after": best["select_mean_loss"],
        "interval": {
            "method": "percentile bootstrap over eval chunks (resampled with replacement; "
            "perplexity = exp(sum of chunk losses / sum of chunk masked tokens))",
            "level": p.interval_level,
            "resamples": p.bootstrap_resamples,
            "seed": "[eval_seed, crc32(language), 0x626F6F74]: the same resamples for every model of a language",
        },
        "history": state.history,
    }
    write_json(out / MODEL_METRICS_JSON, metrics)
    return metrics


def check_ranks(world_size: int, cuda_devices: int | None, job_label: str) -> None:
    """Refuse more ranks than the GPUs this job sees (``cuda_devices``; None: CPU ranks, any number)."""
    if cuda_devices is not None and world_size > cuda_devices:
        stage_id = job_label.split("[", 1)[0]
        raise ValueError(
            f"train: {world_size} processes but {cuda_devices} visible GPU(s): one process per GPU; set "
            f"executor.resources.{stage_id}.processes to at most {cuda_devices} or ask for {world_size} gpus"
        )


def prefetch_train(params: TrainParams) -> Iterator[str]:
    """The pretrained checkpoint this stage fine-tunes, if any (``prefetch`` hook)."""
    from stages.hub import fetch_model

    if params.pretrained is not None:
        yield fetch_model(params.pretrained)


@stage(
    "train",
    params=TrainParams,
    inputs={"dataset": Input(type="dataset"), "tokenizer": Input(type="tokenizer"),
            "base": Input(type="model", optional=True)},
    outputs={"model": "model"},
    # 2: best checkpoint chosen on the selection half; reported numbers on the reporting half.
    # 3: AdamW is fused (HF Trainer's default; ~10x faster steps on the CPU, results differ from 2 in the last
    #    bits) and, on CUDA, mixed_precision auto is bf16 where the GPU has it (else fp16).
    version="3",
    checkpoints=True,
    prefetch=prefetch_train,
)
def train_stage(params: TrainParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Fine-tune a masked LM on every language; per-language perplexity before and after."""
    import torch
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]
    from accelerate.utils import DataLoaderConfiguration  # type: ignore[import-untyped]
    from transformers import DataCollatorForLanguageModeling, get_scheduler

    from stages import mlm
    from stages.device import announce, check_gpus, device_training_plan

    check_gpus(ctx.gpus, ctx.job_label)  # before anything is loaded: a CPU torch on a GPU node fails now
    dataset = get_input(inputs, "dataset")
    tok_input = get_input(inputs, "tokenizer")
    base = optional_input(inputs, "base")
    source = model_source(params, base.path if base else None)
    threads = mlm.configure_threads()  # (this rank's share of the job's CPUs)
    tokenizer = mlm.load_tokenizer(tok_input.path)
    if tokenizer.mask_token_id is None:
        raise ValueError("train: the tokenizer has no mask token")
    languages = dataset_languages(dataset.path)
    # every language's memory-mapped record batches, in order: the same rows as one array per language
    order = TrainOrder([b for lang in languages for b in split_blocks(dataset.path, lang, "train")],
                       params.batch_size, ctx.seed)
    total = params.max_steps if params.max_steps is not None else params.epochs * order.steps_per_epoch
    cuda = torch.cuda.is_available()
    plan = device_training_plan(params.mixed_precision)  # autocast dtype, fused AdamW, pinned batches (CUDA)
    mixed = plan.mixed_precision
    check_ranks(ctx.world_size, torch.cuda.device_count() if cuda else None, ctx.job_label)
    # cpu=True makes accelerate set up gloo among CPU ranks (without it, a CPU-only torch would join
    # the ranks but train each alone); split_batches: the lr schedule steps once per (global) step
    accelerator = Accelerator(mixed_precision=mixed, cpu=ctx.world_size > 1 and not cuda,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    announce(accelerator.device)
    finished = False
    try:
        if accelerator.num_processes != ctx.world_size:
            raise ValueError(
                f"train: the environment makes {accelerator.num_processes} processes, the job {ctx.world_size}: "
                "set executor.resources.train.processes instead of launching with torchrun/accelerate"
            )
        model = _build_model(source, tok_input.path, order.block_size, ctx.seed)
        meta_vocab = read_dataset_meta(dataset.path).get("vocab_size")
        mlm.check_model_fits(model, order.block_size, None if meta_vocab is None else int(meta_vocab) - 1)
        optimizer = _optimizer(model, params, fused=plan.fused_adamw)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=params.warmup_steps,
                                  num_training_steps=total)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        trainer = TrainRun(accelerator, model, optimizer, scheduler, params, Path(ctx.checkpoint_dir),
                           non_blocking=plan.pin_memory, stop_on_host=plan.stop_flag_on_host)
        state = TrainState(total_steps=total, seed=ctx.seed)
        resume = existing_dir(trainer.ckpt_dir / STATE_DIR)
        if resume is not None:
            state = trainer.load_checkpoint(resume, state)
            if trainer.main:
                print(f"train: resuming from step {state.step}/{total} ({resume})", flush=True)
        eval_sets: dict[str, dict[str, list[Any]]] = {
            half: {
                lang: mlm.language_eval_batches(dataset.path, lang, tokenizer, params.eval_batch_size,
                                                params.eval_seed, max_chunks=params.max_eval_chunks,
                                                mlm_probability=params.mlm_probability, split=half)
                for lang in languages
            }
            for half in (SELECT, REPORT)
        }
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=params.mlm_probability)
        ctx.log({"train/total_steps": float(total), "train/chunks": float(order.size),
                 "train/threads": float(threads)}, step=state.step)
        try:
            run_loop(trainer, state, order, collator, tokenizer, eval_sets, ctx)
        except StageInterrupted:
            finished = True  # every rank stopped at the same step, after rank 0's checkpoint
            raise
        finished = True
        if not trainer.main:
            return {}  # rank 0 writes the output (the engine commits rank 0's alone)
        metrics = _write_outputs(trainer, state, tokenizer, languages, order, ctx.output_dir("model"))
    finally:
        if finished and accelerator.num_processes > 1:  # (never after an error: a peer may be gone)
            accelerator.state.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
    if not params.keep_checkpoint:
        for name in (STATE_DIR, BEST_DIR):
            shutil.rmtree(Path(ctx.checkpoint_dir) / name, ignore_errors=True)
    n_params = sum(p.numel() for p in trainer.unwrapped.parameters())
    return {"model": {
        "languages": languages,
        "steps": total,
        "best_step": state.best_step,
        "eval_split": REPORT,
        "perplexity_before": {lang: m["perplexity"] for lang, m in metrics["before"].items()},
        "perplexity_after": {lang: m["perplexity"] for lang, m in metrics["after"].items()},
        "perplexity_interval_before": {lang: m["perplexity_interval"] for lang, m in metrics["before"].items()},
        "perplexity_interval_after": {lang: m["perplexity_interval"] for lang, m in metrics["after"].items()},
        "mean_loss_before": metrics["mean_loss_before"],
        "mean_loss_after": metrics["mean_loss_after"],
        "pretrained": params.pretrained,
        "num_parameters": int(n_params),
        "mixed_precision": mixed,
        "block_size": order.block_size,
    }}


TRAIN: StageDef = train_stage
