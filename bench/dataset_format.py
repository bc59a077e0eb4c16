"""Artifact formats: the ``datasets`` directories (``save_to_disk``) of the corpus, dataset and parallel-corpus
artifacts vs the .npy / JSON-lines files they replaced, written and read as the stages do.

Synthetic data of the full study's shapes (``specs/full_study.yaml``), one language at a time (the study
has 8): a token dataset of 100,000 blocks x 512 int32 ids (the tokenize stage's train cap per language),
a corpus of 80,000 documents (its Wikipedia cap per language; lengths log-normal, mean ~2,500
characters, Latin, Cyrillic and CJK words), a parallel set of 10,000 sentences x 8 languages (~150
characters each).

- before: ``np.save`` / ``np.load(mmap_mode="r")`` per split; ``stages._io.write_jsonl`` / ``read_jsonl``
  (what ``stages.formats`` did before version 3 of tokenize, version 2 of corpus and parallel);
- ours: ``stages.formats.{dataset,corpus,parallel}`` now: a pyarrow table, a sha256 fingerprint of the
  rows, ``save_to_disk``; reading with ``load_from_disk`` (memory-mapped), token blocks as numpy views of
  the record batches (``split_blocks``), texts streamed one record batch at a time;
- HF plain: what a user of ``datasets`` would write without care: ``Dataset.from_dict`` of Python lists
  (timed on a tenth of the rows, x 10), ``with_format("numpy")`` batches, ``with_format("torch")`` loads,
  iterating rows, ``to_list()``.

Access patterns timed: the training stage's random batches (``TrainOrder.batch``: 32 rows a step, 2,000
steps, each row fetched by index), a whole split loaded into a torch tensor (evaluation), the corpus'
texts streamed in order (tokenizer, tokenize), the parallel rows read at once (encode). Everything is
in the page cache (written just before): the formats' CPU costs, not the disk's. Each timing is the best
of ``--repeats``. Two writes of the same rows must give identical files (checked and printed).

    python bench/dataset_format.py           # ~1 minute, ~1.5 GB under $TMPDIR (removed after)
    python bench/dataset_format.py --quick   # a tenth of the rows
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import PYTHON, best_of, header, table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from stages._io import read_jsonl, write_jsonl  # noqa: E402
from stages.formats import corpus as corpus_format  # noqa: E402
from stages.formats import dataset as dataset_format  # noqa: E402
from stages.formats import hf  # noqa: E402
from stages.formats import parallel as parallel_format  # noqa: E402
from stages.train_data import TrainOrder  # noqa: E402

FULL = {"blocks": 100_000, "docs": 80_000, "sentences": 10_000}
QUICK = {"blocks": 10_000, "docs": 8_000, "sentences": 1_000}
BLOCK, LANGS, STEPS, BATCH = 512, ("en", "es", "ru", "de", "zh", "ar", "hi", "ur"), 2_000, 32


def word_pool(rng: np.random.Generator, chars: int) -> str:
    """A long string of random words in three scripts, to slice documents from."""
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "абвгдежзийклмнопрстуфхцчшщыэюя", "的一是不了人我在有他这中大来上国个到说们"]
    words = ["".join(rng.choice(list(a), size=int(n))) for a in alphabets for n in rng.integers(2, 10, size=3_000)]
    picks = rng.integers(0, len(words), size=chars // 5)
    return " ".join(words[i] for i in picks)[:chars]


def make_docs(n: int, rng: np.random.Generator) -> list[corpus_format.Doc]:
    lengths = np.minimum(rng.lognormal(np.log(1_500), 1.0, size=n).astype(int) + 50, 100_000)
    pool = word_pool(rng, 4_000_000)
    starts = rng.integers(0, len(pool) - 100_000, size=n)
    return [corpus_format.Doc(id=f"doc-{i}", text=pool[s : s + ln])
            for i, (s, ln) in enumerate(zip(starts, lengths, strict=True))]


def make_rows(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    pool = word_pool(rng, 1_000_000)
    starts = rng.integers(0, len(pool) - 400, size=(n, len(LANGS)))
    lengths = rng.integers(60, 300, size=(n, len(LANGS)))
    ends = starts + lengths
    return [
        {"id": f"1:{i // 30 + 1}:{i % 30 + 1}", **{lang: pool[starts[i, j] : ends[i, j]] for j, lang in enumerate(LANGS)}}
        for i in range(n)
    ]


def row(label: str, before: float, ours: float, plain: float | None = None) -> list[Any]:
    """A table row: the two formats (and HF plain) with their ratios to before."""
    return [label, before, ours, ours / before, "" if plain is None else plain, "" if plain is None else plain / before]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


class Fresh:
    """A fresh directory for every write (best-of timing never overwrites)."""

    def __init__(self, root: Path) -> None:
        self.root, self.n = root, 0

    def __call__(self) -> Path:
        self.n += 1
        return self.root / f"w{self.n}"


def bench_tokens(n: int, fresh: Fresh, repeats: int) -> tuple[list[list[Any]], str]:
    arr = np.random.default_rng(0).integers(0, 250_002, size=(n, BLOCK), dtype=np.int32)
    splits = {"train": arr}
    old_dir, new_dir = fresh(), fresh()

    def write_old() -> None:
        d = fresh() / "en"
        d.mkdir(parents=True)
        np.save(d / "train.npy", np.ascontiguousarray(arr, dtype=np.int32))

    def write_new() -> None:
        dataset_format.write_language(fresh(), "en", splits)

    def write_plain() -> None:  # what Dataset.from_dict of the rows costs, on a tenth of them
        from datasets import Dataset

        hf.save(fresh() / "en", Dataset.from_dict({"input_ids": arr[: n // 10].tolist()}))

    t_old_w, _ = best_of(repeats, write_old)
    t_new_w, _ = best_of(repeats, write_new)
    t_plain_w = 10 * best_of(1, write_plain)[0]
    (old_dir / "en").mkdir(parents=True)
    np.save(old_dir / "en" / "train.npy", arr)
    dataset_format.write_language(new_dir, "en", splits)
    again = fresh()
    dataset_format.write_language(again, "en", splits)
    identical = same_files(new_dir, again)

    t_old_o, old = best_of(repeats, lambda: np.load(old_dir / "en" / "train.npy", mmap_mode="r"))
    t_new_o, blocks = best_of(repeats, lambda: dataset_format.split_blocks(new_dir, "en", "train"))
    plain = hf.load(new_dir / "en")["train"].with_format("numpy")

    def steps(arrays: list[Any]) -> Any:
        order = TrainOrder(arrays, BATCH, seed=1)
        return [order.batch(s) for s in range(STEPS)]

    t_old_b, b_old = best_of(repeats, lambda: steps([old]))
    t_new_b, b_new = best_of(repeats, lambda: steps(blocks))
    order = TrainOrder([old], BATCH, seed=1)
    t_plain_b, b_plain = best_of(repeats, lambda: [plain[order.indices(s)]["input_ids"] for s in range(STEPS)])
    if not all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(b_old, b_new, b_plain, strict=True)):
        raise SystemExit("the batches differ between the formats")

    t_old_l, t_old = best_of(repeats, lambda: torch.from_numpy(np.load(old_dir / "en" / "train.npy")))
    t_new_l, t_new = best_of(repeats, lambda: torch.from_numpy(dataset_format.load_split(new_dir, "en", "train")))
    t_plain_l, t_plain = best_of(repeats, lambda: hf.load(new_dir / "en")["train"].with_format("torch")[:]["input_ids"])
    if not (torch.equal(t_old, t_new) and torch.equal(t_old.long(), t_plain)):
        raise SystemExit("the loaded tensors differ between the formats")

    mb = arr.nbytes / 2**20
    rows = [
        row(f"tokens {n:,} x {BLOCK}: write", t_old_w, t_new_w, t_plain_w),
        row("  open (memory-mapped)", t_old_o, t_new_o),
        row(f"  {STEPS:,} random batches of {BATCH} (TrainOrder)", t_old_b, t_new_b, t_plain_b),
        row("  whole split -> torch tensor", t_old_l, t_new_l, t_plain_l),
        row(f"  bytes on disk ({mb:,.0f} MiB of ids)", du(old_dir), du(new_dir)),
    ]
    return rows, f"tokens: two writes of the same rows give identical files: {identical}"


def bench_corpus(n: int, fresh: Fresh, repeats: int) -> tuple[list[list[Any]], str]:
    docs = make_docs(n, np.random.default_rng(1))
    old_dir, new_dir = fresh(), fresh()

    def write_old(out: Path) -> None:
        write_jsonl(out / "en" / "train.jsonl", ({"id": d.id, "text": d.text} for d in docs))

    def write_plain() -> None:
        from datasets import Dataset

        part = docs[: n // 10]
        hf.save(fresh(), Dataset.from_dict({"id": [d.id for d in part], "text": [d.text for d in part]}))

    t_old_w, _ = best_of(repeats, lambda: write_old(fresh()))
    t_new_w, _ = best_of(repeats, lambda: corpus_format.write_language(fresh(), "en", {"train": docs}))
    t_plain_w = 10 * best_of(1, write_plain)[0]
    write_old(old_dir)
    corpus_format.write_language(new_dir, "en", {"train": docs})
    again = fresh()
    corpus_format.write_language(again, "en", {"train": docs})
    identical = same_files(new_dir, again)

    t_old_r, old = best_of(repeats, lambda: [str(r["text"]) for r in read_jsonl(old_dir / "en" / "train.jsonl")])
    t_new_r, new = best_of(repeats, lambda: list(corpus_format.read_texts(new_dir, "en", "train")))
    t_plain_r, plain = best_of(repeats, lambda: [row["text"] for row in hf.load(new_dir / "en")["train"]])
    if not old == new == plain == [d.text for d in docs]:
        raise SystemExit("the texts differ between the formats")
    chars = sum(len(d.text) for d in docs)
    rows = [
        row(f"corpus {n:,} docs ({chars / 1e6:,.0f} M chars): write", t_old_w, t_new_w, t_plain_w),
        row("  stream every text in order", t_old_r, t_new_r, t_plain_r),
        row("  bytes on disk", du(old_dir), du(new_dir)),
    ]
    return rows, f"corpus: two writes of the same documents give identical files: {identical}"


def bench_parallel(n: int, fresh: Fresh, repeats: int) -> tuple[list[list[Any]], str]:
    rows_in = make_rows(n, np.random.default_rng(2))
    old_dir, new_dir = fresh(), fresh()

    def read_old() -> list[dict[str, str]]:
        return [{k: str(v) for k, v in r.items()} for r in read_jsonl(old_dir / "parallel.jsonl")]

    t_old_w, _ = best_of(repeats, lambda: write_jsonl(fresh() / "parallel.jsonl", rows_in))
    t_new_w, _ = best_of(repeats, lambda: parallel_format.write_parallel(fresh(), LANGS, rows_in))
    write_jsonl(old_dir / "parallel.jsonl", rows_in)
    parallel_format.write_parallel(new_dir, LANGS, rows_in)
    again = fresh()
    parallel_format.write_parallel(again, LANGS, rows_in)
    identical = same_files(new_dir, again)
    t_old_r, old = best_of(repeats, read_old)
    t_new_r, (_, new) = best_of(repeats, lambda: parallel_format.read_parallel(new_dir))
    t_plain_r, plain = best_of(repeats, lambda: hf.load(new_dir).to_list())
    if not old == new == plain == rows_in:
        raise SystemExit("the parallel rows differ between the formats")
    rows = [
        row(f"parallel {n:,} x {len(LANGS)} languages: write", t_old_w, t_new_w),
        row("  read every row", t_old_r, t_new_r, t_plain_r),
        row("  bytes on disk", du(old_dir), du(new_dir)),
    ]
    return rows, f"parallel: two writes of the same rows give identical files: {identical}"


def import_cost(repeats: int) -> list[list[Any]]:
    """A reading job's extra import: datasets (a fresh interpreter each time) vs numpy alone."""

    def run(module: str) -> float:
        return best_of(repeats, lambda: subprocess.run([PYTHON, "-c", f"import {module}"], check=True))[0]

    t_np, t_ds = run("numpy"), run("numpy, datasets")
    return [row("python -c 'import numpy' / '+ datasets'", t_np, t_ds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per timing")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    header("artifact formats: datasets save_to_disk vs .npy / JSON lines")
    root = Path(tempfile.mkdtemp(prefix="bench-dataset-format-"))
    try:
        fresh = Fresh(root)
        results = [bench_tokens(size["blocks"], fresh, args.repeats), bench_corpus(size["docs"], fresh, args.repeats),
                   bench_parallel(size["sentences"], fresh, args.repeats)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [r for rs, _ in results for r in rs] + import_cost(args.repeats)
    heads = ["what (one language)", "before: .npy/.jsonl s", "ours: save_to_disk s", "ours/before", "HF plain s", "plain/before"]
    print(table(heads, rows))
    print()
    for _, note in results:
        print(note)


if __name__ == "__main__":
    main()
