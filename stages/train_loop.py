"""The training loop of stage ``train``: steps, evaluations of both test halves, checkpoints, stop requests.

Each step draws its batch from :class:`stages.train_data.TrainOrder`, reseeds torch from the step
(:func:`stages.train_data.step_seed`), masks with transformers' collator and takes one optimizer step
(with several processes, each rank its share of the rows, the loss scaled so that the gradient is the
whole batch's). Evaluations (:func:`stages.mlm.evaluate_chunks`, both halves) come before training, every
``eval_every`` steps and at the end; the best model is chosen on the selection half only. A stop request
is agreed among ranks and ends the loop with a checkpoint and ``StageInterrupted``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from orchestrator.stage import StageContext, StageInterrupted
from stages.formats.dataset import REPORT, SELECT
from stages.train_data import TrainOrder, shard_rows, step_seed
from stages.train_run import TrainRun, TrainState


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


def run_loop(trainer: TrainRun, state: TrainState, order: TrainOrder, collator: Any, tokenizer: Any,
          eval_sets: dict[str, dict[str, list[Any]]], ctx: StageContext) -> None:
    """Train from ``state.step`` to ``state.total_steps``, evaluating and checkpointing on the way."""
    import torch

    from stages import mlm

    p = trainer.params
    special = torch.tensor(mlm.special_token_ids(tokenizer), dtype=torch.long)
    pad_id = tokenizer.pad_token_id
    ctx.progress(state.step, state.total_steps, "step")  # (the engine keeps rank 0's only)
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
        ctx.progress(state.step, state.total_steps, "step")
        if state.step % p.log_every == 0 or state.step == state.total_steps:
            lr = trainer.scheduler.get_last_lr()[0]
            ctx.log({"train/loss": state.loss_sum / state.loss_count, "train/lr": lr,
                     "train/epoch": state.step / order.steps_per_epoch}, step=state.step)
            state.loss_sum, state.loss_count = 0.0, 0
        if p.checkpoint_every is not None and state.step % p.checkpoint_every == 0 \
                and state.step < state.total_steps:
            trainer.checkpoint(state, f"every {p.checkpoint_every} steps")


def mean_loss(per_language: dict[str, dict[str, float]]) -> float:
    """Mean over languages of the eval loss (the best-model criterion)."""
    return sum(m["loss"] for m in per_language.values()) / len(per_language)
