"""Which tiny model, corpus, tokenizer, block length and schedule make the demo's model learn?

Each candidate is the demo's data and model stages as they were before this benchmark
(``BEFORE``: corpus, tokenizer, tokenize, pretrain, train; languages, model and executor from
specs/demo.yaml) with some fields changed, submitted with the local executor into one shared store
(a candidate reuses the jobs it shares with an earlier one: same keys). ``nt-b128-e4`` is what
specs/demo.yaml now runs. For each it prints what the demo needs from its model:

- pre-training: perplexity at step 0 (mean over languages), at the end, start/end ratio, and the
  change over the last evaluation interval (still falling?);
- fine-tuning: held-out perplexity before -> after per language (every language must improve);
- the perplexity of a per-language unigram model on the same held-out text (does the model know
  more than word frequencies?);
- seconds of each stage (wall clock, this machine, 2 at a time as the demo runs them).

Run: .venv/bin/python bench/demo_model.py [--only NAME ...] [--quick] [--store DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("corpus_base", "corpus", "tokenizer", "tokenize_base", "tokenize", "pretrain", "train")
BEFORE = """
corpus:
  params: {languages: "${languages}", source: bible, max_docs_per_language: 400, test_fraction: 0.1}
tokenizer:
  inputs: {corpus: corpus}
  params: {vocab_size: 8000}
tokenize:
  inputs: {corpus: corpus, tokenizer: tokenizer}
  params: {block_size: 64, max_chunks_per_language: 1500, max_test_chunks_per_language: 100}
pretrain:
  stage: train
  inputs: {dataset: tokenize, tokenizer: tokenizer}
  params: {config: "${model.config}", batch_size: 32, lr: 0.002, epochs: 2, eval_every: 200, max_eval_chunks: 32}
train:
  inputs: {dataset: tokenize, tokenizer: tokenizer, base: pretrain}
  params: {batch_size: 32, lr: 0.0003, warmup_steps: 30, max_steps: 200, eval_every: 50, max_eval_chunks: 32}
"""

OLD_TESTAMENT = list(range(40, 67))  # books dropped to keep the Old Testament (Psalms is dropped anyway)
NEW_TESTAMENT = list(range(1, 40))  # books dropped to keep the New Testament


def base_on_other_books(doc: dict[str, Any]) -> None:
    """The base model learns from other text than the study's: pre-training (and the tokenizer)
    on the Old Testament, fine-tuning and every evaluation on the New Testament, as XLM-R was
    pre-trained on CommonCrawl and fine-tuned on Wikipedia in the original study."""
    stages = doc["stages"]
    corpus = stages["corpus"]
    base = {"stage": "corpus", "params": {**corpus["params"], "bible_drop_books": [19, *OLD_TESTAMENT]}}
    corpus["params"] = {**corpus["params"], "bible_drop_books": NEW_TESTAMENT}
    tokenize_base = {
        "stage": "tokenize",
        "inputs": {"corpus": "corpus_base", "tokenizer": "tokenizer"},
        "params": dict(stages["tokenize"]["params"]),
    }
    stages["tokenizer"]["inputs"] = {"corpus": "corpus_base"}
    stages["pretrain"]["inputs"] = {**stages["pretrain"]["inputs"], "dataset": "tokenize_base"}
    doc["stages"] = {
        "corpus_base": base,
        **{k: v for k, v in stages.items() if k in ("corpus", "tokenizer")},
        "tokenize_base": tokenize_base,
        **{k: v for k, v in stages.items() if k not in ("corpus", "tokenizer")},
    }


# name -> {dotted spec field: value} (a function: changes the spec document itself)
CANDIDATES: dict[str, dict[str, Any]] = {
    "current": {},  # the demo before: vocabulary 8,000, blocks of 64, lr 2e-3, 2 epochs, one text
    "warmup": {"stages.pretrain.params.warmup_steps": 100, "stages.pretrain.params.lr": 0.001},
    "lr5e-3": {"stages.pretrain.params.warmup_steps": 50, "stages.pretrain.params.lr": 0.005},
    "v2k-lr3e-3": {
        "stages.tokenizer.params.vocab_size": 2000,
        "stages.pretrain.params.warmup_steps": 50,
        "stages.pretrain.params.lr": 0.003,
        "stages.pretrain.params.epochs": 3,
    },
    "e4": {"stages.pretrain.params.epochs": 4},
    "e4-lr3e-3": {
        "stages.pretrain.params.epochs": 4,
        "stages.pretrain.params.lr": 0.003,
        "stages.pretrain.params.warmup_steps": 100,
    },
    "nt-e4": {"stages.pretrain.params.epochs": 4, "__doc__": base_on_other_books},
    "nt-b128-e4": {  # the same tokens in blocks twice as long: 128 positions, so encode cuts few verses
        "stages.tokenize.params.block_size": 128,
        "stages.tokenize.params.max_chunks_per_language": 750,
        "stages.tokenize.params.max_test_chunks_per_language": 50,
        "stages.pretrain.params.batch_size": 16,
        "stages.pretrain.params.max_eval_chunks": 16,
        "stages.pretrain.params.epochs": 4,
        "stages.train.params.batch_size": 16,
        "stages.train.params.max_eval_chunks": 16,
        "__doc__": base_on_other_books,
    },
}


def set_field(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for part in path:
        doc = doc.setdefault(part, {})
    doc[last] = value


def candidate_spec(base: dict[str, Any], name: str, changes: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    doc["name"] = f"dm-{name}"
    doc["stages"] = {k: v for k, v in doc["stages"].items() if k in KEEP}
    for dotted, value in changes.items():
        if dotted != "__doc__":
            set_field(doc, dotted, value)
    if "__doc__" in changes:
        changes["__doc__"](doc)
    return doc


def submit(spec: Path, store: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--store", str(store)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"{spec}: submit failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.monotonic() - start


def job_output(store: Path, study: str, stage_id: str, output: str) -> Path:
    """The files of one output of the study's job of ``stage_id`` (found by job key: a candidate
    that shares a job with an earlier one shares its artifact, named after the earlier study)."""
    sys.path.insert(0, str(ROOT))
    from orchestrator.artifacts import LocalStore

    artifacts = LocalStore(store / "artifacts")
    plan = json.loads((store / "studies" / study / "plan.json").read_text())
    key = next(j["key"] for j in plan["jobs"] if j["stage_id"] == stage_id)
    return artifacts.materialize(artifacts.job_outputs(key)[output])


def model_metrics(store: Path, study: str, stage_id: str) -> dict[str, Any]:
    return json.loads((job_output(store, study, stage_id, "model") / "metrics.json").read_text())


def mean_ppl(record: dict[str, Any]) -> float:
    """A history record's perplexity over languages (exp of the mean per-language loss)."""
    return math.exp(record["mean_loss"])


def per_language(record: dict[str, Any]) -> dict[str, float]:
    return {lang: m["perplexity"] for lang, m in record.items() if isinstance(m, dict) and "perplexity" in m}


def unigram_perplexity(store: Path, study: str) -> float:
    """What a model that knows only token frequencies reaches: exp of the mean over languages of
    the cross-entropy of held-out tokens under each language's add-one smoothed train unigram."""
    import numpy as np

    data = job_output(store, study, "tokenize", "dataset")  # (puts the project on sys.path)
    from stages.formats.dataset import dataset_languages, load_split

    meta = json.loads((data / "meta.json").read_text())
    vocab = int(meta["vocab_size"])
    losses = []
    for lang in dataset_languages(data):
        counts = np.bincount(load_split(data, lang, "train").ravel(), minlength=vocab) + 1.0
        logp = np.log(counts / counts.sum())
        losses.append(float(-logp[load_split(data, lang, "report").ravel()].mean()))
    return math.exp(sum(losses) / len(losses))


def summarize(name: str, store: Path, seconds: dict[str, float]) -> dict[str, Any]:
    study = f"dm-{name}"
    pre = model_metrics(store, study, "pretrain")
    fine = model_metrics(store, study, "train")
    hist = sorted(pre["history"], key=lambda r: r["step"])
    start, last, before_last = mean_ppl(hist[0]), mean_ppl(hist[-1]), mean_ppl(hist[-2])
    before, after = per_language(fine["before"]), per_language(fine["after"])
    return {
        "candidate": name,
        "pretrain_start": start,
        "pretrain_end": last,
        "unigram": unigram_perplexity(store, study),
        "fall": start / last,
        "last_interval_change": last / before_last - 1,
        "finetune": {lang: (before[lang], after[lang]) for lang in before},
        "finetune_all_improve": all(after[lang] < before[lang] for lang in before),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES), metavar="NAME")
    parser.add_argument("--quick", action="store_true", help="only what specs/demo.yaml runs (nt-b128-e4)")
    parser.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "xls-demo-model")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.only = ["nt-b128-e4"]
    base = yaml.safe_load((ROOT / "specs" / "demo.yaml").read_text())
    base["stages"] = yaml.safe_load(BEFORE)
    base["storage"] = {"root": str(args.store)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            doc = candidate_spec(base, name, CANDIDATES[name])
            seconds: dict[str, float] = {}
            for upto in ("tokenize", "pretrain", "train"):  # one submit per stage: its own wall clock
                part = copy.deepcopy(doc)
                part["stages"] = {k: v for k, v in doc["stages"].items() if KEEP.index(k) <= KEEP.index(upto)}
                resources = part["executor"].get("resources", {})
                part["executor"]["resources"] = {k: v for k, v in resources.items() if k == "default" or k in part["stages"]}
                spec = Path(tmp) / f"{name}-{upto}.yaml"
                spec.write_text(yaml.safe_dump(part, sort_keys=False))
                seconds[upto] = submit(spec, args.store)
            res = summarize(name, args.store, seconds)
            results.append(res)
            ft = " ".join(f"{lang} {b:.0f}->{a:.0f}" for lang, (b, a) in res["finetune"].items())
            print(
                f"{name:>12}: pretrain {res['pretrain_start']:.0f} -> {res['pretrain_end']:.1f} ({res['fall']:.1f}x; "
                f"unigram {res['unigram']:.0f}; "
                f"last interval {res['last_interval_change']:+.1%}) | fine-tune {ft} "
                f"(all improve: {res['finetune_all_improve']}) | s: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
