"""Stage train: a tiny from-scratch run, outputs and metrics, and resume after a stop request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from stagekit import FakeContext, make_input, run_stage  # noqa: E402
from test_mlm import TINY_CONFIG, make_dataset, make_tokenizer  # noqa: E402

from orchestrator.stage import StageInterrupted  # noqa: E402
from stages import mlm  # noqa: E402
from stages.train import TRAIN, TrainParams  # noqa: E402
from stages.train_data import TrainOrder  # noqa: E402

LANGS = ("aa", "bb", "cc")
PARAMS = {
    "config": TINY_CONFIG,
    "max_steps": 12,
    "batch_size": 8,
    "lr": 1e-2,
    "eval_every": 4,
    "checkpoint_every": 5,
    "eval_batch_size": 4,
    "log_every": 1,
    "mixed_precision": "auto",
}


class StopAt(FakeContext):
    """A FakeContext that sets the real stop event when the training loss of ``stop_step`` is logged."""

    stop_step: int = -1

    def log(self, metrics, step=None) -> None:  # type: ignore[override]
        super().log(metrics, step)
        if "train/loss" in metrics and step == self.stop_step:
            self.stop_requested.set()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("train")
    tok = make_tokenizer(root / "tokenizer")
    ds = make_dataset(root / "dataset", langs=LANGS, n_train=16, n_test=8)
    return {"dataset": make_input(ds, "dataset"), "tokenizer": make_input(tok, "tokenizer")}


@pytest.fixture(scope="module")
def reference(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run."""
    ctx = FakeContext(tmp_path_factory.mktemp("ref"), seed=11)
    meta = run_stage(TRAIN, PARAMS, ctx, data)
    return {"ctx": ctx, "meta": meta, "out": ctx.root / "outputs" / "model", "dataset": data["dataset"].path}


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_outputs_metrics_and_logs(reference: dict) -> None:
    out, meta, ctx = reference["out"], reference["meta"]["model"], reference["ctx"]
    metrics = _metrics(out)
    assert metrics["steps"] == 12 and meta["steps"] == 12
    assert ctx.reported == [(step, 12, "step") for step in range(13)]  # ctx.progress: each step
    assert metrics["languages"] == list(LANGS)
    assert [h["step"] for h in metrics["history"]] == [0, 4, 8, 12]
    assert metrics["best_step"] in (4, 8, 12)
    # the best checkpoint is chosen on the selection half; the reported numbers are the reporting half's
    assert metrics["eval_split"] == "report" and metrics["selection_split"] == "select"
    best = [h for h in metrics["history"] if h["step"] == metrics["best_step"]][0]
    assert best["select_mean_loss"] == min(h["select_mean_loss"] for h in metrics["history"][1:])
    assert metrics["select_after"] == best["select"] and metrics["after"] == best["languages"]
    assert metrics["select_mean_loss_after"] == best["select_mean_loss"]
    assert metrics["mean_loss_after"] == best["mean_loss"]
    for lang in LANGS:
        before, after = metrics["before"][lang], metrics["after"][lang]
        assert after["perplexity"] == pytest.approx(np.exp(after["loss"]))
        assert meta["perplexity_before"][lang] == before["perplexity"]
        assert meta["perplexity_after"][lang] == after["perplexity"]
        for part in ("before", "after", "final"):  # bootstrap intervals next to every reported perplexity
            lo, hi = metrics[part][lang]["perplexity_interval"]
            assert lo < metrics[part][lang]["perplexity"] < hi
        assert meta["perplexity_interval_before"][lang] == before["perplexity_interval"]
        assert meta["perplexity_interval_after"][lang] == after["perplexity_interval"]
        assert metrics["select_after"][lang]["loss"] != pytest.approx(after["loss"], rel=1e-3)  # halves differ
    assert metrics["interval"]["level"] == 0.95 and metrics["interval"]["resamples"] == 1000
    # it learned (a tiny model in 12 steps: the chosen model beats the initial one on average)
    assert metrics["mean_loss_after"] < metrics["mean_loss_before"] - 0.05
    losses = [m["train/loss"] for m, _ in ctx.metrics if "train/loss" in m]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    # the saved model reloads and reproduces the recorded eval loss with the deterministic masks
    model = mlm.load_model(out)
    tok = mlm.load_tokenizer(out)
    assert len(tok) == model.config.vocab_size
    report = mlm.language_eval_batches(reference["dataset"], "aa", tok, batch_size=3, split="report")
    select = mlm.language_eval_batches(reference["dataset"], "aa", tok, batch_size=3, split="select")
    assert mlm.evaluate(model, report)["loss"] == pytest.approx(metrics["after"]["aa"]["loss"], rel=1e-5)
    assert mlm.evaluate(model, select)["loss"] == pytest.approx(metrics["select_after"]["aa"]["loss"], rel=1e-5)
    # logged metrics: per-language eval at every evaluation (both halves), train loss and lr at every step
    logged = {(k, s) for m, s in ctx.metrics for k in m}
    for lang in LANGS:
        for step in (0, 4, 8, 12):
            assert (f"eval/{lang}/loss", step) in logged and (f"eval/{lang}/perplexity", step) in logged
            assert (f"eval_select/{lang}/loss", step) in logged
    lrs = [m["train/lr"] for m, _ in ctx.metrics if "train/lr" in m]
    assert len(lrs) == 12 and lrs[-1] == pytest.approx(0.0) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert (ctx.root / "checkpoint" / "train_state" / "state.json").is_file()  # periodic checkpoint
    # the device plan (stages.device.training_plan): fp32 on the CPU, AdamW fused (as HF Trainer's default)
    saved = torch.load(ctx.root / "checkpoint" / "train_state" / "optimizer.pt")
    assert meta["mixed_precision"] == "no" and all(g["fused"] for g in saved["param_groups"])


def test_resume_after_stop_request_gives_the_same_result(data: dict, reference: dict, tmp_path: Path) -> None:
    ctx = StopAt(tmp_path, seed=11)
    ctx.stop_step = 6
    with pytest.raises(StageInterrupted, match="step 6/12"):
        run_stage(TRAIN, PARAMS, ctx, data)
    state = json.loads((tmp_path / "checkpoint" / "train_state" / "state.json").read_text())
    assert state["state"]["step"] == 6 and state["reason"] == "stop requested"
    assert not (tmp_path / "outputs" / "model" / "metrics.json").exists()

    resumed = StopAt(tmp_path, seed=11)  # same checkpoint dir: a requeued job
    meta = run_stage(TRAIN, PARAMS, resumed, data)
    steps = [s for m, s in resumed.metrics if "train/loss" in m]
    assert steps == list(range(7, 13))  # continued, not restarted

    ref_out, out = reference["out"], tmp_path / "outputs" / "model"
    ref_m, got_m = _metrics(ref_out), _metrics(out)
    assert got_m["steps"] == ref_m["steps"] == 12 and got_m["best_step"] == ref_m["best_step"]
    for part in ("before", "after", "final"):
        for lang in LANGS:
            assert got_m[part][lang]["loss"] == pytest.approx(ref_m[part][lang]["loss"], rel=1e-6, abs=1e-7)
    assert meta["model"]["steps"] == 12
    a, b = mlm.load_model(ref_out).state_dict(), mlm.load_model(out).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_the_reporting_half_does_not_steer_training(data: dict, reference: dict, tmp_path: Path) -> None:
    """Replace every language's reporting half by other chunks: the selection-half history, the best
    step and the saved weights stay exactly the same, only the reported numbers move."""
    from stages.formats.dataset import load_split, write_language

    ref, ds = reference["dataset"], tmp_path / "dataset"
    for i, lang in enumerate(LANGS):
        other = load_split(ref, LANGS[(i + 1) % len(LANGS)], "train")[:8]
        write_language(ds, lang, {"train": load_split(ref, lang, "train"), "select": load_split(ref, lang, "select"),
                                  "report": other})
    (ds / "meta.json").write_bytes((ref / "meta.json").read_bytes())
    run_stage(TRAIN, PARAMS, FakeContext(tmp_path / "run", seed=11), {**data, "dataset": make_input(ds, "dataset")})
    ref_m, got_m = _metrics(reference["out"]), _metrics(tmp_path / "run" / "outputs" / "model")
    assert got_m["best_step"] == ref_m["best_step"]
    assert [h["select_mean_loss"] for h in got_m["history"]] == [h["select_mean_loss"] for h in ref_m["history"]]
    assert got_m["after"]["aa"]["loss"] != pytest.approx(ref_m["after"]["aa"]["loss"], rel=1e-3)
    a, b = mlm.load_model(reference["out"]).state_dict(), mlm.load_model(tmp_path / "run" / "outputs" / "model")
    for k, v in b.state_dict().items():
        assert torch.equal(a[k], v), k


def test_stop_during_evaluation_reruns_it(data: dict, reference: dict, tmp_path: Path) -> None:
    class StopInEval(FakeContext):
        def log(self, metrics, step=None) -> None:  # type: ignore[override]
            super().log(metrics, step)
            if "train/loss" in metrics and step == 8:  # the eval at step 8 starts right after
                self.stop_requested.set()

    ctx = StopInEval(tmp_path, seed=11)
    with pytest.raises(StageInterrupted, match="step 8/12"):
        run_stage(TRAIN, PARAMS, ctx, data)
    assert not any(s == 8 and "eval/mean_loss" in m for m, s in ctx.metrics)  # that eval was abandoned
    resumed = FakeContext(tmp_path, seed=11)
    run_stage(TRAIN, PARAMS, resumed, data)
    assert any(s == 8 and "eval/mean_loss" in m for m, s in resumed.metrics)
    ref_m, got_m = _metrics(reference["out"]), _metrics(tmp_path / "outputs" / "model")
    assert [h["step"] for h in got_m["history"]] == [0, 4, 8, 12]
    for h_ref, h_got in zip(ref_m["history"], got_m["history"], strict=True):
        assert h_got["mean_loss"] == pytest.approx(h_ref["mean_loss"], rel=1e-6)
        assert h_got["select_mean_loss"] == pytest.approx(h_ref["select_mean_loss"], rel=1e-6)


def test_another_seed_gives_another_run(data: dict, reference: dict, tmp_path: Path) -> None:
    ctx = FakeContext(tmp_path, seed=12)
    run_stage(TRAIN, {**PARAMS, "max_steps": 4, "checkpoint_every": None}, ctx, data)
    ref_m, got_m = _metrics(reference["out"]), _metrics(tmp_path / "outputs" / "model")
    assert got_m["steps"] == 4
    assert got_m["before"]["aa"]["loss"] != pytest.approx(ref_m["before"]["aa"]["loss"], rel=1e-4)


def test_params_need_exactly_one_model_source(tmp_path: Path) -> None:
    from stages.train import model_source

    with pytest.raises(ValueError, match="exactly one model source"):
        model_source(TrainParams(), None)
    with pytest.raises(ValueError, match="only one of"):
        TrainParams(pretrained="FacebookAI/xlm-roberta-base", config={"hidden_size": 8})
    with pytest.raises(ValueError, match="exactly one model source: connect a 'base'"):
        model_source(TrainParams(config={"hidden_size": 8}), tmp_path)
    assert model_source(TrainParams(), tmp_path) == tmp_path  # a model artifact of the study
    assert model_source(TrainParams(config={"hidden_size": 8}), None) == {"hidden_size": 8}
    p = TrainParams(pretrained="FacebookAI/xlm-roberta-base", config={})
    defaults = (p.batch_size, p.lr, p.weight_decay, p.epochs, p.warmup_steps, p.mlm_probability)
    assert defaults == (8, 2e-5, 0.01, 1, 0, 0.15)
    assert p.mixed_precision == "auto"


def test_train_order_visits_every_chunk_once_per_epoch() -> None:
    arrays = [np.arange(10 * 3).reshape(10, 3), 100 + np.arange(7 * 3).reshape(7, 3)]
    order = TrainOrder(arrays, batch_size=4, seed=5)
    assert order.steps_per_epoch == 5 and order.size == 17
    epoch0 = np.concatenate([order.batch(s) for s in range(5)])
    rows = {tuple(r) for r in np.concatenate(arrays).tolist()}
    assert {tuple(r) for r in epoch0.tolist()} == rows and len(epoch0) == 17
    assert not np.array_equal(order.indices(5), order.indices(0)) or not np.array_equal(
        order.indices(6), order.indices(1))
    again = TrainOrder(arrays, batch_size=4, seed=5)
    assert np.array_equal(again.batch(7), order.batch(7))  # a pure function of the step
    assert not np.array_equal(TrainOrder(arrays, 4, seed=6).indices(0), order.indices(0))


def test_train_order_over_the_record_batches_of_a_dataset(tmp_path: Path) -> None:
    """The training stage hands TrainOrder every language's memory-mapped record batches (``split_blocks``:
    a saved split of 2,500 rows has several): the batches are those of one array per language."""
    from stages.formats.dataset import split_blocks, write_language

    rng = np.random.default_rng(0)
    arrays = {lang: rng.integers(0, 1000, size=(n, 4), dtype=np.int32) for lang, n in (("aa", 2_500), ("bb", 300))}
    for lang, arr in arrays.items():
        write_language(tmp_path, lang, {"train": arr})
    blocks = [b for lang in arrays for b in split_blocks(tmp_path, lang, "train")]
    assert len(blocks) > 2 and not any(b.flags.writeable for b in blocks)  # views of the memory map
    by_block, by_language = TrainOrder(blocks, 32, seed=3), TrainOrder(list(arrays.values()), 32, seed=3)
    assert by_block.steps_per_epoch == by_language.steps_per_epoch == 88
    for step in (0, 1, 87, 88, 200):
        np.testing.assert_array_equal(by_block.batch(step), by_language.batch(step))


CHILD = """
import json, sys, time
from pathlib import Path
sys.path[:0] = [{tests!r}, {root!r}]
from stagekit import FakeContext, make_input, run_stage
from orchestrator.runner import EXIT_INTERRUPTED, _install_stop_handlers
from orchestrator.stage import StageInterrupted
from stages.train import TRAIN

class Ctx(FakeContext):
    def log(self, metrics, step=None):
        super().log(metrics, step)
        if "train/loss" in metrics and step == 3:  # tell the parent, then wait for its SIGTERM
            Path({marker!r}).write_text("3")
            deadline = time.time() + 60
            while not self.stop_requested.is_set() and time.time() < deadline:
                time.sleep(0.02)

ctx = Ctx(Path({work!r}), seed=11)
_install_stop_handlers(ctx.stop_requested, graceful=TRAIN.checkpoints)  # the runner's own handler
inputs = {{"dataset": make_input({ds!r}, "dataset"), "tokenizer": make_input({tok!r}, "tokenizer")}}
try:
    run_stage(TRAIN, json.loads({params!r}), ctx, inputs)
except StageInterrupted as e:
    print("interrupted:", e, flush=True)
    sys.exit(EXIT_INTERRUPTED)
sys.exit(0)
"""


def test_sigterm_in_a_subprocess_checkpoints_and_resumes(data: dict, reference: dict, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    tests = Path(__file__).resolve().parent
    marker, work = tmp_path / "at-step-3", tmp_path / "job"
    script = CHILD.format(tests=str(tests), root=str(tests.parent), marker=str(marker), work=str(work),
                          ds=str(data["dataset"].path), tok=str(data["tokenizer"].path), params=json.dumps(PARAMS))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=5)[0][-3000:] if proc.poll() is not None else "timeout"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out[-3000:]
    assert "received SIGTERM" in out and "step 3/12" in out
    state = json.loads((work / "checkpoint" / "train_state" / "state.json").read_text())
    assert state["state"]["step"] == 3

    resumed = FakeContext(work, seed=11)
    run_stage(TRAIN, PARAMS, resumed, data)
    assert [s for m, s in resumed.metrics if "train/loss" in m] == list(range(4, 13))
    ref_m, got_m = _metrics(reference["out"]), _metrics(work / "outputs" / "model")
    assert got_m["best_step"] == ref_m["best_step"]
    for lang in LANGS:
        assert got_m["after"][lang]["loss"] == pytest.approx(ref_m["after"][lang]["loss"], rel=1e-5)
