"""The training loop of stage ``train``: steps, evaluations of both test halves, checkpoints, stop requests.

Each step draws its batch from :class:`stages.train_data.TrainOrder`, reseeds torch from the step
(:func:`stages.train_data.step_seed`), masks with transformers' collator (:class:`stages.train_data.StepBatches`)
and takes one optimizer step (:func:`stages.train_step.train_step`; with several processes, each rank its
share of the rows, the loss scaled so that the gradient is the whole batch's). Evaluations
(:func:`stages.mlm.evaluate_chunks`, both halves) come before training, every ``eval_every`` steps and at
the end; the best model is chosen on the selection half only. A stop request is agreed among ranks and
ends the loop with a checkpoint and ``StageInterrupted``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from orchestrator.stage import StageContext, StageInterrupted
from stages.formats.dataset import REPORT, SELECT
from stages.train_data import StepBatches, TrainOrder, step_loader
from stages.train_run import TrainRun, TrainState
from stages.train_step import LossMeter, train_step


class _Stop(Exception):
    pass


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


def _interrupt(trainer: TrainRun, state: TrainState, ctx: StageContext) -> StageInterrupted:
    path = trainer.checkpoint(state, "stop requested")
    ctx.log({"train/checkpoint_step": float(state.step)}, step=state.step)
    return StageInterrupted(f"train: stop requested; checkpoint at step {state.step}/{state.total_steps} in {path}")


def run_loop(trainer: TrainRun, state: TrainState, order: TrainOrder, collator: Any, tokenizer: Any,
          eval_sets: dict[str, dict[str, list[Any]]], ctx: StageContext) -> None:
    """Train from ``state.step`` to ``state.total_steps``, evaluating and checkpointing on the way.

    The steps' batches come from a :func:`stages.train_data.step_loader` (pinned on CUDA); the training loss
    is read from the device only at log lines and checkpoints (:class:`stages.train_step.LossMeter`)."""
    from stages import mlm

    p = trainer.params
    acc = trainer.accelerator
    batches = StepBatches(order, collator, mlm.special_token_ids(tokenizer), tokenizer.pad_token_id, state.seed,
                          acc.process_index, acc.num_processes)
    loader = iter(step_loader(batches, state.step, state.total_steps, trainer.non_blocking))
    meter = LossMeter(state.loss_sum, acc.device, acc.num_processes)
    ctx.progress(state.step, state.total_steps, "step")  # (the engine keeps rank 0's only)
    while True:
        if _eval_due(state.step, state.total_steps, p.eval_every) and state.last_eval_step != state.step:
            try:
                _evaluate_step(trainer, state, eval_sets, ctx)
            except _Stop:
                meter.sync_state(state)
                raise _interrupt(trainer, state, ctx) from None
        if state.step >= state.total_steps:
            break
        if trainer.stop_agreed(ctx.stop_requested.is_set()):
            meter.sync_state(state)
            raise _interrupt(trainer, state, ctx)
        meter.add(train_step(trainer, next(loader), state.step, state.seed))
        state.step += 1
        state.loss_count += 1
        ctx.progress(state.step, state.total_steps, "step")
        if state.step % p.log_every == 0 or state.step == state.total_steps:
            lr = trainer.scheduler.get_last_lr()[0]
            ctx.log({"train/loss": meter.read() / state.loss_count, "train/lr": lr,
                     "train/epoch": state.step / order.steps_per_epoch}, step=state.step)
            meter.reset()
            state.loss_sum, state.loss_count = 0.0, 0
        if p.checkpoint_every is not None and state.step % p.checkpoint_every == 0 \
                and state.step < state.total_steps:
            meter.sync_state(state)
            trainer.checkpoint(state, f"every {p.checkpoint_every} steps")


def mean_loss(per_language: dict[str, dict[str, float]]) -> float:
    """Mean over languages of the eval loss (the best-model criterion)."""
    return sum(m["loss"] for m in per_language.values()) / len(per_language)
