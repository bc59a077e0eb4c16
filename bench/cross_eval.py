"""cross_eval: the job with no forward pass twice vs the job as it was (version 2), on the demo's shapes.

The demo's model shape (``specs/demo.yaml``: XLM-R-shaped masked LM, hidden 128, 4 layers x 4 heads,
intermediate 256, a WordLevel vocabulary of 8,000 ids, 128-token chunks), saved once with random
weights and fine-tuned for 2 steps by the real ``train`` stage (so that its ``metrics.json`` holds real
"after" numbers); 7 languages of random token ids (each its own id range), 50 chunks per test half; the
demo's cross_eval settings (``max_eval_chunks`` 16, batch 8, 5 size-matched random masks per language, 1
thread as the demo's ``cpus: 1``). Masks: per language, 6 of the 16 heads kept at random (the demo keeps
4 to 8); a second case has one language keep every head (a tight threshold of a sweep prunes nothing).

- ours: ``stages.evaluate.cross_eval_stage``, in process, with the ``ctx.provenance`` the engine hands it
  (train's output and dataset committed to a real ``LocalStore`` with the producer record the runner
  writes, ``orchestrator.provenance.upstream``): the full row is train's, an all-ones mask is the full
  model, identical masks run once;
- before: :func:`cross_eval_v2` below, the version-2 stage's computation kept faithfully: one model load,
  batches masked once per column, every row's cells evaluated with a memo keyed by the mask's bytes, the
  full model computed on every column, an all-ones mask evaluated under its gates.

Both are whole jobs (model load, batches, every cell, intervals; ours also writes its JSON/CSV). They are
timed in turn, ``--repeats`` rounds, best round each. The matrices must be equal exactly (perplexity, loss,
intervals; the script says so), and ours must say its full row came from train.

    python bench/cross_eval.py            # 7 languages, 5 random masks each (~1-2 minutes on 2 CPUs)
    python bench/cross_eval.py --quick    # 3 languages, 2 random masks each
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import BenchContext, header, table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LANGUAGES = ("en", "es", "ru", "de", "zh", "ar", "hi")
CONFIG = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256}  # the demo's
VOCAB = 8000
BLOCK = 128
TEST_CHUNKS = 50
KEPT = 6  # heads kept per language mask (of 16)
EVAL = {"max_eval_chunks": 16, "eval_batch_size": 8}  # the demo's cross_eval (and train) settings
TRAIN = {"max_steps": 2, "batch_size": 16, "lr": 3e-4, "checkpoint_every": None, **EVAL}


# ----------------------------------------------------------------------------------------- the data
def make_study(root: Path, languages: Sequence[str]) -> tuple[Path, Path]:
    """(model_dir, dataset_dir): a random demo-shaped model with a WordLevel tokenizer, and a dataset."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stages.formats.dataset import write_language
    from stages.mlm import build_model

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(VOCAB - 5)), "<mask>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                  unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=BLOCK)
    model_dir = root / "model"
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    build_model(CONFIG, model_dir, block_size=BLOCK).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    data_dir = root / "dataset"
    span = (VOCAB - 10) // len(languages)
    for i, lang in enumerate(languages):
        lo = 4 + span * i
        splits = {}
        for split, n in (("train", 64), ("select", TEST_CHUNKS), ("report", TEST_CHUNKS)):
            chunks = splits[split] = rng.integers(lo, lo + 2 * span, size=(n, BLOCK)).clip(4, VOCAB - 2).astype(np.int32)
            chunks[:, 0], chunks[:, -1] = 0, 2
        write_language(data_dir, lang, splits)
    meta = {"languages": list(languages), "block_size": BLOCK, "vocab_size": len(tok), "mask_token_id": VOCAB - 1,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "unk_token_id": 3}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return model_dir, data_dir


def language_masks(languages: Sequence[str], full_language: str | None) -> dict[str, np.ndarray]:
    """Per language, KEPT of the 16 heads kept at random (every head for ``full_language``)."""
    rng = np.random.default_rng(7)
    shape = (CONFIG["num_hidden_layers"], CONFIG["num_attention_heads"])
    out = {}
    for lang in languages:
        mask = np.zeros(shape[0] * shape[1], np.float32)
        mask[rng.permutation(mask.size)[:KEPT]] = 1
        out[lang] = np.ones(shape, np.float32) if lang == full_language else mask.reshape(shape)
    return out


def committed_inputs(root: Path, model_dir: Path, data_dir: Path, masks: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """train run for real, its output and the dataset committed with the runner's producer records;
    the inputs and provenance a cross_eval job gets."""
    from orchestrator.artifacts import ArtifactRef, LocalStore, Producer
    from orchestrator.provenance import upstream
    from orchestrator.stage import ResolvedInput
    from stages.train import TRAIN as TRAIN_STAGE

    def resolved(version: Any, metadata: Mapping[str, Any], point: Mapping[str, Any] | None = None) -> ResolvedInput:
        return ResolvedInput(version.ref.name, version.ref.version, version.type, store.materialize(version.ref),
                             dict(metadata), dict(point or {}), f"k-{version.ref.name}")

    def producer(stage: str, inputs: tuple[ArtifactRef, ...] = (), params: Mapping[str, Any] | None = None) -> Producer:
        return Producer(job_key=f"k-{stage}", study="bench", stage=stage, job_label=stage, inputs=inputs,
                        provenance={"params": dict(params or {}), "stage_version": "bench", "seed": 1234})

    store = LocalStore(root / "store")
    data_v = store.log("bench.tokenize.dataset", "dataset", data_dir, producer=producer("tokenize"))
    tok_v = store.log("bench.tokenizer.tokenizer", "tokenizer", model_dir, producer=producer("tokenizer"))
    base_v = store.log("bench.pretrain.model", "model", model_dir, producer=producer("train"))
    ctx = BenchContext(root / "train", job_label="cross_eval")
    params = TRAIN_STAGE.params.model_validate(TRAIN)
    train_inputs = {"dataset": resolved(data_v, {}), "tokenizer": resolved(tok_v, {}), "base": resolved(base_v, {})}
    meta = TRAIN_STAGE.fn(params, train_inputs, ctx)["model"]
    refs = (data_v.ref, tok_v.ref, base_v.ref)
    model_v = store.log("bench.train.model", "model", ctx.root / "outputs" / "model", metadata=meta,
                        producer=producer("train", refs, params.model_dump(mode="json")))
    mask_inputs = []
    for lang, mask in masks.items():
        folder = root / "masks" / lang
        folder.mkdir(parents=True)
        np.save(folder / "mask.npy", mask)
        (folder / "mask.json").write_text(json.dumps({"language": lang, "mask": mask.tolist()}))
        v = store.log(f"bench.prune.mask.language-{lang}", "head-mask", folder, producer=producer("prune", (model_v.ref,)))
        mask_inputs.append(resolved(v, {"language": lang}, {"language": lang}))
    inputs = {"model": resolved(model_v, meta), "dataset": resolved(data_v, {}), "masks": mask_inputs}
    provenance = {"upstream": upstream(store, [model_v.ref, data_v.ref, *(m.ref for m in mask_inputs)])}
    return {"inputs": inputs, "provenance": provenance}


# ----------------------------------------------------------------------------------------- the runs
def cross_eval_ours(root: Path, inputs: Mapping[str, Any], provenance: Mapping[str, Any], params: Any) -> dict[str, Any]:
    from stages.evaluate import CROSS_EVAL

    ctx = BenchContext(root, provenance, job_label="cross_eval")
    meta = CROSS_EVAL.fn(params, inputs, ctx)["metrics"]
    doc = json.loads((root / "outputs" / "metrics" / "cross_eval.json").read_text())
    return {**doc, "meta": meta}


def cross_eval_v2(inputs: Mapping[str, Any], params: Any, seed: int) -> dict[str, Any]:
    """The version-2 stage's computation (no reuse; all-ones masks gated), kept faithfully: the matrices."""
    from stages.eval_model import eval_batches_for, eval_tokenizer, load_eval_model
    from stages.formats.masks import mask_inputs
    from stages.gating import HeadGates
    from stages.mlm import bootstrap_seed, evaluate_chunks
    from stages.random_masks import random_mask_seeds, random_rows

    model_in, data_in = inputs["model"], inputs["dataset"]
    masks = mask_inputs(inputs)
    cols = list(json.loads((data_in.path / "meta.json").read_text())["languages"])
    model, _ = load_eval_model(model_in.path, 0, "cross_eval")
    tokenizer = eval_tokenizer(model_in.path, data_in.path)
    batches = {lang: eval_batches_for(data_in.path, lang, tokenizer, model, params.eval_batch_size, params.eval_seed,
                                      params.max_eval_chunks, params.mlm_probability, params.split) for lang in cols}
    rows: list[tuple[str, np.ndarray | None]] = [(lang, mask) for lang, mask, _ in masks] + [("full", None)]
    randoms = random_rows([(lang, mask) for lang, mask, _ in masks], random_mask_seeds(seed, params.random_mask_seeds))
    memo: dict[tuple[bytes | None, str], dict[str, float]] = {}

    def cell(mask: np.ndarray | None, lang: str) -> dict[str, float]:
        key = (None if mask is None else np.asarray(mask, dtype=np.float32).tobytes(), lang)
        if key not in memo:
            if mask is None:
                chunks = evaluate_chunks(model, batches[lang])
            else:
                with HeadGates(model, mask):
                    chunks = evaluate_chunks(model, batches[lang])
            lo, hi = chunks.perplexity_interval(bootstrap_seed(params.eval_seed, lang), params.bootstrap_resamples,
                                                params.interval_level)
            memo[key] = {**chunks.summary(), "perplexity_lo": lo, "perplexity_hi": hi}
        return memo[key]

    main = [[cell(mask, lang) for lang in cols] for _, mask in rows]
    rnd = [[cell(mask, lang)["perplexity"] for lang in cols] for _, mask in randoms]
    return {
        "perplexity": [[c["perplexity"] for c in r] for r in main],
        "loss": [[c["loss"] for c in r] for r in main],
        "perplexity_interval": [[[c["perplexity_lo"], c["perplexity_hi"]] for c in r] for r in main],
        "random": rnd,
        "forward_cells": len(memo),
    }


def same_matrices(ours: Mapping[str, Any], before: Mapping[str, Any]) -> bool:
    """Every perplexity, loss, interval and random-mask perplexity equal, bit for bit."""
    rnd = ours.get("random", {}).get("perplexity_by_seed")
    flat_rnd = [r for lang_rows in rnd for r in lang_rows] if rnd is not None else []
    return all(ours[k] == before[k] for k in ("perplexity", "loss", "perplexity_interval")) and flat_rnd == before["random"]


def run_case(root: Path, name: str, languages: Sequence[str], full_language: str | None, seeds: int,
             repeats: int) -> list[Any]:
    from stages.evaluate import CROSS_EVAL

    case = root / name
    model_dir, data_dir = make_study(case / "study", languages)
    committed = committed_inputs(case, model_dir, data_dir, language_masks(languages, full_language))
    params = CROSS_EVAL.params.model_validate({**EVAL, "random_mask_seeds": seeds})
    best = {"ours": float("inf"), "before": float("inf")}
    ours: dict[str, Any] = {}
    before: dict[str, Any] = {}
    for r in range(repeats):  # in turn: other load on the machine spreads over both
        t0 = time.perf_counter()
        ours = cross_eval_ours(case / f"ours{r}", committed["inputs"], committed["provenance"], params)
        best["ours"] = min(best["ours"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        before = cross_eval_v2(committed["inputs"], params, 1234)
        best["before"] = min(best["before"], time.perf_counter() - t0)
    if ours["full_model_row"]["source"] != "train":
        raise SystemExit(f"{name}: ours did not reuse train's numbers: {ours['full_model_row']['reason']}")
    same = "yes, bit for bit" if same_matrices(ours, before) else "NO"
    cells = len(ours["rows"]) * len(languages) + len(languages) * seeds * len(languages)
    return [name, cells, before["forward_cells"], ours["meta"]["forward_cells"], round(best["before"], 2),
            round(best["ours"], 2), round(best["ours"] / best["before"], 3), same]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 languages, 2 random masks each")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best of)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's cross_eval has cpus: 1)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # stages.mlm.configure_threads reads it
    languages = LANGUAGES[:3] if args.quick else LANGUAGES
    seeds = 2 if args.quick else 5
    import torch

    header(
        f"cross_eval: demo-shaped MLM (hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers x "
        f"{CONFIG['num_attention_heads']} heads, vocabulary {VOCAB:,}), {len(languages)} languages x "
        f"{EVAL['max_eval_chunks']} chunks of {BLOCK}, {seeds} random masks per language; torch {torch.__version__}, "
        f"{args.threads} thread(s); best of {args.repeats}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-cross-eval-") as tmp:
        rows = [run_case(Path(tmp), "demo masks", languages, None, seeds, args.repeats),
                run_case(Path(tmp), f"{languages[-1]} keeps every head", languages, languages[-1], seeds, args.repeats)]
    print(table(["case", "cells", "forward cells before", "forward cells ours", "before s", "ours s", "ours / before",
                 "same matrices"], rows))
    print("\n(cells: every row's and random mask's cells; forward cells: those evaluated with forward passes)")


if __name__ == "__main__":
    main()
