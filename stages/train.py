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
  lr 2e-5, weight decay 0.01, one epoch, fp16 on CUDA (``mixed_precision="auto"``), via
  ``accelerate.Accelerator``;
- evaluation per language with **deterministic** masks (``stages.mlm``; seed ``eval_seed``, the
  same for every stage that measures perplexity) before training, every ``eval_every`` steps and at
  the end, on **both halves** of the test documents (``stages.dataset``): the *selection* half
  (``select.npy``) and the *reporting* half (``report.npy``);
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
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageInterrupted, StageParams, stage
from stages._io import get_input, optional_input, write_json

CHECKPOINT_FORMAT = "cross-lingual-subnets/train-checkpoint/2"  # 2: history records both test halves
STATE_DIR = "train_state"
BEST_DIR = "best"
METRICS_FILE = "metrics.json"
SELECT: Literal["select"] = "select"
REPORT: Literal["report"] = "report"
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
        "auto", description="auto: fp16 on CUDA, no on CPU."
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


# --------------------------------------------------------------------------------------------------
# Data order and training state (no torch)
# --------------------------------------------------------------------------------------------------


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


def mean_loss(per_language: dict[str, dict[str, float]]) -> float:
    """Mean over languages of the eval loss (the best-model criterion)."""
    return sum(m["loss"] for m in per_language.values()) / len(per_language)


def resolve_mixed_precision(value: str, cuda: bool) -> str:
    """``auto`` -> fp16 on CUDA, no on CPU; fp16 without CUDA is an error."""
    if value == "auto":
        return "fp16" if cuda else "no"
    if value == "fp16" and not cuda:
        raise ValueError("mixed_precision=fp16 needs a CUDA GPU; use 'auto', 'no' or 'bf16'")
    return value


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing it, so that a complete copy exists at every moment."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _existing_dir(path: Path) -> Path | None:
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
        that all ranks stop at the same point; with one process, ``requested`` itself."""
        if self.accelerator.num_processes == 1:
            return requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if requested else 0.0], device=self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
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
        _replace_dir(tmp, final)
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
        _replace_dir(tmp, self.ckpt_dir / BEST_DIR)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _optimizer(model: Any, params: TrainParams) -> Any:
    """AdamW with Trainer's parameter groups (no decay on biases and LayerNorm parameters)."""
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
    return torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.999), eps=1e-8)


def _build_model(source: str | Path | dict[str, Any], tokenizer_dir: Path, block_size: int, seed: int) -> Any:
    import torch

    from stages import mlm

    torch.manual_seed(int(seed) % 2**63)
    if isinstance(source, dict):
        return mlm.build_model(source, tokenizer_dir, block_size)
    return mlm.load_model(str(source))


def _run_eval(
    trainer: TrainRun, eval_sets: dict[str, list[Any]], should_stop: Callable[[], bool]
) -> dict[str, dict[str, Any]]:
    """Per language: loss, perplexity, masked tokens and the bootstrap ``perplexity_interval``."""
    from stages import mlm

    p = trainer.params
    out: dict[str, dict[str, Any]] = {}
    for lang, batches in eval_sets.items():
        try:  # (the unwrapped model: no DDP buffer broadcast per batch; one process: the same model)
            chunks = mlm.evaluate_chunks(trainer.unwrapped, batches, autocast=trainer.accelerator.autocast,
                                         should_stop=should_stop)
        except mlm.EvalStopped as e:
            raise _Stop() from e
        lo, hi = chunks.perplexity_interval(mlm.bootstrap_seed(p.eval_seed, lang), p.bootstrap_resamples,
                                            p.interval_level)
        out[lang] = {**chunks.summary(), "perplexity_interval": [lo, hi]}
    return out


def _eval_log(results: dict[str, dict[str, Any]], mean: float, prefix: str) -> dict[str, float]:
    """The scalars logged for one half: ``<prefix>/<lang>/{loss,perplexity}``, the mean loss and perplexity."""
    metrics = {f"{prefix}/{lang}/{k}": float(m[k]) for lang, m in results.items() for k in ("loss", "perplexity")}
    metrics.update({f"{prefix}/mean_loss": mean, f"{prefix}/mean_perplexity": math.exp(min(mean, 700))})
    return metrics


def _eval_due(step: int, total: int, every: int | None) -> bool:
    return step == 0 or step == total or (every is not None and step % every == 0)


def _evaluate_step(trainer: TrainRun, state: TrainState, eval_sets: dict[str, dict[str, list[Any]]],
                   ctx: StageContext) -> None:
    """Evaluate both test halves at ``state.step``, log, record, and keep the model if it is the best
    after step 0 **by the selection half** (the reporting half is measured, never used to choose)."""
    def should_stop() -> bool:
        return trainer.stop_agreed(ctx.stop_requested.is_set())

    select = _run_eval(trainer, eval_sets[SELECT], should_stop)
    report = _run_eval(trainer, eval_sets[REPORT], should_stop)
    select_mean, report_mean = mean_loss(select), mean_loss(report)
    record = {"step": state.step, "mean_loss": report_mean, "languages": report,
              "select_mean_loss": select_mean, "select": select}
    state.history = [r for r in state.history if r["step"] != state.step] + [record]
    state.last_eval_step = state.step
    ctx.log({**_eval_log(report, report_mean, "eval"), **_eval_log(select, select_mean, "eval_select")},
            step=state.step)
    if state.step > 0 and (state.best_loss is None or select_mean < state.best_loss):
        state.best_loss, state.best_step = select_mean, state.step
        if trainer.main:
            trainer.save_best()


def _train_step(trainer: TrainRun, order: TrainOrder, collator: Any, special: Any, pad_id: int | None,
                state: TrainState) -> float:
    import torch

    from stages import mlm

    acc = trainer.accelerator
    ids = torch.from_numpy(order.batch(state.step))
    torch.manual_seed(step_seed(state.seed, state.step))
    attention = (ids != pad_id).long() if pad_id is not None else torch.ones_like(ids)
    inputs, labels = collator.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, special))
    world = acc.num_processes
    weight = 1.0
    if world > 1:  # this rank's rows of the whole step's batch and masks
        masked = int((labels != mlm.IGNORE_INDEX).sum())  # in the whole batch: the same on every rank
        start, stop = shard_rows(len(ids), acc.process_index, world)
        if start == stop:  # no rows for this rank (a short last batch): one row, weighted 0, keeps DDP in step
            start, stop, weight = 0, 1, 0.0
        inputs, attention, labels = inputs[start:stop], attention[start:stop], labels[start:stop]
        torch.manual_seed(step_seed(state.seed, state.step, acc.process_index))  # this rank's dropout
    batch = {"input_ids": inputs.to(acc.device), "attention_mask": attention.to(acc.device),
             "labels": labels.to(acc.device)}
    trainer.model.train()
    with acc.autocast():
        if world == 1:
            loss, _ = mlm.mlm_loss(trainer.model, batch)
        else:  # sum over this rank's masked tokens / the step's, times the ranks (DDP averages gradients)
            loss_sum, _ = mlm.mlm_loss(trainer.model, batch, reduction="sum")
            loss = loss_sum * (weight * world / max(masked, 1))
    acc.backward(loss)
    if trainer.params.max_grad_norm is not None:
        acc.clip_grad_norm_(trainer.model.parameters(), trainer.params.max_grad_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if world > 1:  # the whole step's loss: the mean over ranks of their shares as weighted above
        import torch.distributed as dist

        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / world
    return float(loss.detach())


def _interrupt(trainer: TrainRun, state: TrainState, ctx: StageContext) -> StageInterrupted:
    path = trainer.checkpoint(state, "stop requested")
    ctx.log({"train/checkpoint_step": float(state.step)}, step=state.step)
    return StageInterrupted(f"train: stop requested; checkpoint at step {state.step}/{state.total_steps} in {path}")


def _loop(trainer: TrainRun, state: TrainState, order: TrainOrder, collator: Any, tokenizer: Any,
          eval_sets: dict[str, dict[str, list[Any]]], ctx: StageContext) -> None:
    """Train from ``state.step`` to ``state.total_steps``, evaluating and checkpointing on the way."""
    import torch
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    from stages import mlm

    p = trainer.params
    special = torch.tensor(mlm.special_token_ids(tokenizer), dtype=torch.long)
    pad_id = tokenizer.pad_token_id
    bar = tqdm(total=state.total_steps, initial=state.step, desc=f"train[{ctx.job_label}]", unit="step",
               mininterval=2.0, leave=False, disable=not trainer.main)
    try:
        while True:
            if _eval_due(state.step, state.total_steps, p.eval_every) and state.last_eval_step != state.step:
                try:
                    _evaluate_step(trainer, state, eval_sets, ctx)
                except _Stop:
                    raise _interrupt(trainer, state, ctx) from None
            if state.step >= state.total_steps:
                break
            if trainer.stop_agreed(ctx.stop_requested.is_set()):
                raise _interrupt(trainer, state, ctx)
            loss = _train_step(trainer, order, collator, special, pad_id, state)
            state.step += 1
            state.loss_sum += loss
            state.loss_count += 1
            bar.update(1)
            if state.step % p.log_every == 0 or state.step == state.total_steps:
                lr = trainer.scheduler.get_last_lr()[0]
                ctx.log({"train/loss": state.loss_sum / state.loss_count, "train/lr": lr,
                         "train/epoch": state.step / order.steps_per_epoch}, step=state.step)
                bar.set_postfix(loss=f"{state.loss_sum / state.loss_count:.4f}", refresh=False)
                state.loss_sum, state.loss_count = 0.0, 0
            if p.checkpoint_every is not None and state.step % p.checkpoint_every == 0 \
                    and state.step < state.total_steps:
                trainer.checkpoint(state, f"every {p.checkpoint_every} steps")
    finally:
        bar.close()


def _write_outputs(trainer: TrainRun, state: TrainState, tokenizer: Any, languages: list[str],
                   order: TrainOrder, out: Path) -> dict[str, Any]:
    before = state.eval_at(0)
    best = state.eval_at(state.best_step) if state.best_step is not None else None
    final = state.eval_at(state.total_steps)
    if before is None or best is None or final is None:
        raise RuntimeError("train: evaluation history is incomplete")
    best_dir = _existing_dir(trainer.ckpt_dir / BEST_DIR)
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
    write_json(out / METRICS_FILE, metrics)
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
    version="2",  # 2: best checkpoint chosen on the selection half; reported numbers on the reporting half
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
    from stages.device import announce, check_gpus

    check_gpus(ctx.gpus, ctx.job_label)  # before anything is loaded: a CPU torch on a GPU node fails now
    dataset = get_input(inputs, "dataset")
    tok_input = get_input(inputs, "tokenizer")
    base = optional_input(inputs, "base")
    source = model_source(params, base.path if base else None)
    threads = mlm.configure_threads()  # (this rank's share of the job's CPUs)
    tokenizer = mlm.load_tokenizer(tok_input.path)
    if tokenizer.mask_token_id is None:
        raise ValueError("train: the tokenizer has no mask token")
    languages = mlm.dataset_languages(dataset.path)
    order = TrainOrder([mlm.load_split(dataset.path, lang, "train", mmap=True) for lang in languages],
                       params.batch_size, ctx.seed)
    total = params.max_steps if params.max_steps is not None else params.epochs * order.steps_per_epoch
    cuda = torch.cuda.is_available()
    mixed = resolve_mixed_precision(params.mixed_precision, cuda)
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
        meta_vocab = mlm.read_dataset_meta(dataset.path).get("vocab_size")
        mlm.check_model_fits(model, order.block_size, None if meta_vocab is None else int(meta_vocab) - 1)
        optimizer = _optimizer(model, params)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=params.warmup_steps,
                                  num_training_steps=total)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        trainer = TrainRun(accelerator, model, optimizer, scheduler, params, Path(ctx.checkpoint_dir))
        state = TrainState(total_steps=total, seed=ctx.seed)
        resume = _existing_dir(trainer.ckpt_dir / STATE_DIR)
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
            _loop(trainer, state, order, collator, tokenizer, eval_sets, ctx)
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
