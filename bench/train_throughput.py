"""MLM training throughput: the ``train`` stage vs HF ``Trainer`` (tokens/s), same model, data, batch and optimizer.

Both sides train the same randomly initialised ``XLMRobertaForMaskedLM`` (built by ``stages.mlm.build_model``
from the same seed) on the same token dataset (written with the real format, ``stages.formats.dataset``:
random word ids between ``<s>`` ... ``</s>``, two languages), with the same batch size, sequence length,
number of steps and optimizer (AdamW, lr 2e-5, betas 0.9/0.999, eps 1e-8, weight decay 0.01 except on
biases and LayerNorm, linear decay without warm-up, gradient clipping at 1.0), fp32 on the CPU:

- ours: the ``train`` stage itself (``run_stage(TRAIN, ...)``: the real setup, loop and outputs), with
  no checkpoints and one log line; it evaluates one chunk per half and language before the first
  step and after the last, outside the timed window;
- Trainer: ``transformers.Trainer`` with ``DataCollatorForLanguageModeling`` (MLM 15%, 80/10/10) on a
  ``datasets.Dataset`` of the same rows (``input_ids`` only, as the seed's ``run_mlm``-style script
  kept), ``eval_strategy``/``save_strategy``/``logging_strategy`` "no", ``report_to="none"``, no
  tqdm, ``dataloader_num_workers=0``, Trainer's default optimizer (``adamw_torch_fused`` with torch
  >= 2.8, printed), on the CPU.

The clock: the wall time from the end of step 1 to the end of the last step (ours: the stage's
``ctx.progress`` calls; Trainer: a callback's ``on_step_end``), so that setup, the first step
(warm-up), evaluations and the output are outside it for both; tokens/s = (steps - 1) x batch x
sequence length / that time. The two take turns, ``--repeats`` rounds, best round each, on the
threads ``stages.mlm.configure_threads`` picks (both sides run in this process).

Target (issue 17, P10): ours >= 1.0x Trainer's tokens/s.

    python bench/train_throughput.py            # demo shape (batch 16 x 128) and XLM-R base shape (8 x 128)
    python bench/train_throughput.py --quick    # demo shape only, fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from common import BenchContext, header, table, verdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from orchestrator.stage import ResolvedInput  # noqa: E402
from stages import mlm  # noqa: E402
from stages.formats.dataset import write_dataset_meta, write_language  # noqa: E402
from stages.train import TRAIN  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {  # model config, vocabulary (with the 5 specials), batch, steps
    "demo": {"config": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256},
             "vocab": 8000, "batch": 16, "steps": 30},
    "xlmr-base": {"config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                             "intermediate_size": 3072}, "vocab": 250_002, "batch": 8, "steps": 4},
}
SEQ_LEN = 128
SEED = 7
OPT = {"lr": 2e-5, "weight_decay": 0.01, "warmup_steps": 0, "max_grad_norm": 1.0}


def make_tokenizer(out: Path, vocab: int) -> Path:
    """A word-level XLM-R-like tokenizer of ``vocab`` ids (<s>=0 <pad>=1 </s>=2 <unk>=3, words, <mask> last)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<s>", "<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(vocab - 5)), "<mask>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=SEQ_LEN)
    fast.save_pretrained(str(out))
    return out


def make_dataset(out: Path, vocab: int, chunks: int) -> Path:
    """Two languages of ``chunks`` training chunks each (random words, <s> first, </s> last) and 2 test chunks per half."""
    rng = np.random.default_rng(SEED)
    langs = ["l0", "l1"]
    for lang in langs:
        splits = {}
        for split, n in (("train", chunks), ("select", 2), ("report", 2)):
            rows = rng.integers(4, vocab - 1, size=(n, SEQ_LEN))
            rows[:, 0], rows[:, -1] = 0, 2
            splits[split] = rows
        write_language(out, lang, splits)
    write_dataset_meta(out, {"block_size": SEQ_LEN, "vocab_size": vocab, "languages": langs, "pad_token_id": 1})
    return out


def train_rows(dataset: Path) -> np.ndarray:
    return np.concatenate([mlm.load_split(dataset, lang, "train") for lang in ("l0", "l1")])


def params(shape: Mapping[str, Any], steps: int) -> dict[str, Any]:
    return {"config": shape["config"], "max_steps": steps, "batch_size": shape["batch"], **OPT,
            "eval_every": None, "checkpoint_every": None, "log_every": steps, "max_eval_chunks": 1,
            "eval_batch_size": 2, "bootstrap_resamples": 10, "keep_checkpoint": False, "mixed_precision": "auto"}


def rate(step_end: Mapping[int, float], steps: int, tokens_per_step: int) -> float:
    """Tokens/s from the end of step 1 to the end of step ``steps``."""
    return (steps - 1) * tokens_per_step / (step_end[steps] - step_end[1])


def run_ours(shape: Mapping[str, Any], steps: int, tok_dir: Path, dataset: Path) -> float:
    """The ``train`` stage as the engine calls it (a fresh model from the seed); tokens/s of steps 2..N."""
    def resolved(path: Path, kind: str) -> ResolvedInput:
        return ResolvedInput(name=f"bench.{kind}", version=0, type=kind, path=path, metadata={}, point={},
                             job_key=f"bench-{kind}")

    with tempfile.TemporaryDirectory(prefix="train-ours-") as tmp:
        ctx = BenchContext(Path(tmp), seed=SEED, job_label="train[bench]")
        inputs = {"dataset": resolved(dataset, "dataset"), "tokenizer": resolved(tok_dir, "tokenizer")}
        TRAIN.fn(TRAIN.params.model_validate(params(shape, steps)), inputs, ctx)
        return rate(ctx.step_end, steps, shape["batch"] * SEQ_LEN)


def run_trainer(shape: Mapping[str, Any], steps: int, tok_dir: Path, dataset: Path) -> tuple[float, str]:
    """HF Trainer on the same model, rows and optimizer settings; tokens/s of steps 2..N and its optimizer."""
    import datasets
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    ends: dict[int, float] = {}

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends[state.global_step] = time.perf_counter()

    tokenizer = mlm.load_tokenizer(tok_dir)
    torch.manual_seed(SEED)  # as the stage builds its model
    model = mlm.build_model(shape["config"], tok_dir, SEQ_LEN)
    train = datasets.Dataset.from_dict({"input_ids": train_rows(dataset).tolist()})
    with tempfile.TemporaryDirectory(prefix="train-hf-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=shape["batch"], max_steps=steps, learning_rate=OPT["lr"],
            weight_decay=OPT["weight_decay"], warmup_steps=OPT["warmup_steps"], max_grad_norm=OPT["max_grad_norm"],
            lr_scheduler_type="linear", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=SEED,
        )
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[StepClock()])
        trainer.train()
        optim = str(args.optim.value if hasattr(args.optim, "value") else args.optim)
    AcceleratorState._reset_state(reset_partial_state=True)
    return rate(ends, steps, shape["batch"] * SEQ_LEN), optim


def bench_shape(name: str, steps: int, repeats: int, root: Path) -> dict[str, Any]:
    shape = SHAPES[name]
    tok_dir = make_tokenizer(root / f"{name}-tokenizer", shape["vocab"])
    dataset = make_dataset(root / f"{name}-dataset", shape["vocab"], chunks=(steps * shape["batch"] + 1) // 2)
    ours: list[float] = []
    hf: list[float] = []
    optim = "?"
    for _ in range(repeats):  # taking turns
        ours.append(run_ours(shape, steps, tok_dir, dataset))
        rate_hf, optim = run_trainer(shape, steps, tok_dir, dataset)
        hf.append(rate_hf)
    return {"ours": max(ours), "trainer": max(hf), "ours_all": ours, "trainer_all": hf, "optim": optim,
            "steps": steps, "batch": shape["batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="demo shape only, 20 steps, 2 rounds")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: demo and xlmr-base")
    parser.add_argument("--steps", type=int, help="steps per run (default per shape: demo 30, xlmr-base 4)")
    parser.add_argument("--repeats", type=int, help="rounds (best of; default 3, --quick 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, help="torch threads of both sides (default: the stage's choice)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # (read by stages.mlm.configure_threads, in the stage too)
    shapes = args.shapes or (["demo"] if args.quick else ["demo", "xlmr-base"])
    repeats = args.repeats or (2 if args.quick else 3)
    threads = mlm.configure_threads()
    header(f"MLM training throughput: train stage vs HF Trainer; sequence length {SEQ_LEN}; torch {torch.__version__}, "
           f"{threads} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}")
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        for name in shapes:
            steps = args.steps or (20 if args.quick else SHAPES[name]["steps"])
            res = bench_shape(name, steps, repeats, Path(tmp))
            results[name] = res
            cfg = SHAPES[name]["config"]
            label = (f"{name}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocabulary "
                     f"{SHAPES[name]['vocab']:,}; batch {res['batch']} x {SEQ_LEN}, {steps} steps")
            rows.append([label, round(res["ours"]), round(res["trainer"]), round(res["ours"] / res["trainer"], 2)])
            print(f"{name}: ours {[round(x) for x in res['ours_all']]} tokens/s, Trainer ({res['optim']}) "
                  f"{[round(x) for x in res['trainer_all']]} tokens/s", flush=True)
    print()
    print(table(["model, batch, steps", "ours tokens/s", "Trainer tokens/s", "ours / Trainer"], rows))
    worst = min(r["ours"] / r["trainer"] for r in results.values())
    print(f"\ntarget: ours >= 1.0x Trainer's tokens/s: {worst:.2f}x (worst shape) -> {verdict(worst >= 1.0)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
