"""Tests of the ``tokenize`` stage: chunk shapes, doc-level split, selection/reporting halves of the
test documents, remainder, caps and errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
from stagekit import FakeContext, make_input, run_stage, sentences, tree_bytes, write_corpus

from stages.dataset import TOKENIZE, split_test_documents
from stages.formats.dataset import SPLITS, load_split, split_blocks
from stages.tokenizer import TOKENIZER

BLOCK = 16
CYRILLIC = re.compile("[а-яё]")
LATIN = re.compile("[a-z]")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Language 'xx' whose train documents are Latin-script only and test documents Cyrillic only,
    and language 'zh'; every document ends differently so the remainder is never zero by accident."""
    docs = {
        "xx": {
            "train": [" ".join(sentences("en", 4 + d % 3, seed=d)) for d in range(12)],
            "test": [" ".join(sentences("ru", 4 + d % 2, seed=d)) for d in range(5)],
        },
        "zh": {
            "train": ["".join(sentences("zh", 5, seed=d)) for d in range(8)],
            "test": ["".join(sentences("zh", 5, seed=50 + d)) for d in range(3)],
        },
    }
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    """A tokenizer that knows both scripts: trained on a corpus holding train and test texts."""
    both = {
        lang: {"train": [r["text"] for s in ("train", "test") for r in read_docs(corpus_dir, lang, s)]}
        for lang in ("xx", "zh")
    }
    tok_corpus = write_corpus(tmp_path_factory.mktemp("tok_corpus"), both)
    ctx = FakeContext(tmp_path_factory.mktemp("tok"))
    run_stage(TOKENIZER, {"vocab_size": 200}, ctx, {"corpus": make_input(tok_corpus, "corpus")})
    return ctx.output_dir("tokenizer")


def read_docs(corpus: Path, lang: str, split: str) -> list[dict[str, Any]]:
    import datasets

    return datasets.load_from_disk(str(corpus / lang))[split].to_list()


def chunks(out: Path, lang: str, split: str) -> np.ndarray:
    """The chunks of one split as the stages read them (``load_split``), checked against what a researcher
    gets from ``datasets.load_from_disk`` and against the memory-mapped blocks the training stage reads."""
    import datasets

    arr = load_split(out, lang, split)
    opened = datasets.load_from_disk(str(out / lang))[split]
    np.testing.assert_array_equal(opened.with_format("numpy")[:]["input_ids"], arr)
    np.testing.assert_array_equal(np.concatenate(split_blocks(out, lang, split)), arr)
    return arr


def tokenize(
    tmp: Path, corpus: Path, tok: Path, seed: int = 0, **params: Any
) -> tuple[Path, dict[str, Any], FakeContext]:
    ctx = FakeContext(tmp, seed=seed)
    inputs = {"corpus": make_input(corpus, "corpus"), "tokenizer": make_input(tok, "tokenizer")}
    meta = run_stage(TOKENIZE, {"block_size": BLOCK, **params}, ctx, inputs)
    assert meta is not None
    return ctx.output_dir("dataset"), dict(meta["dataset"]), ctx


@pytest.fixture(scope="module")
def dataset(
    tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, tokenizer_dir: Path
) -> tuple[Path, dict[str, Any], FakeContext]:
    return tokenize(tmp_path_factory.mktemp("ds"), corpus_dir, tokenizer_dir)


def load_tok(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def half_docs(corpus: Path, lang: str, split: str) -> list[dict[str, Any]]:
    """The corpus documents a chunk split is made of: train, or every other test document (select:
    positions 0, 2, 4, ...; report: 1, 3, 5, ... in corpus order)."""
    if split == "train":
        return read_docs(corpus, lang, "train")
    test = read_docs(corpus, lang, "test")
    return test[0::2] if split == "select" else test[1::2]


def expected_stream(tok: Any, corpus: Path, lang: str, split: str, boundary: str) -> list[int]:
    """The concatenated token ids the stage should chunk, computed one document at a time."""
    ids: list[int] = []
    for rec in half_docs(corpus, lang, split):
        if boundary == "special":
            ids += tok(rec["text"])["input_ids"]
        else:
            ids += tok(rec["text"], add_special_tokens=False)["input_ids"] + (
                [tok.eos_token_id] if boundary == "eos" else []
            )
    return ids


def test_layout_shapes_and_meta(dataset: tuple[Path, dict[str, Any], FakeContext], tokenizer_dir: Path) -> None:
    import datasets

    out, meta, ctx = dataset
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "xx", "zh"]
    assert ctx.reported == [(0, 2, "language"), (1, 2, "language"), (2, 2, "language")]  # the job's progress
    assert SPLITS == ("train", "select", "report") and meta["splits"] == list(SPLITS)
    for lang in ("xx", "zh"):
        assert sorted(p.name for p in (out / lang).iterdir()) == ["dataset_dict.json", "report", "select", "train"]
        for split in SPLITS:
            arr = chunks(out, lang, split)
            assert arr.dtype == np.int32 and arr.ndim == 2 and arr.shape[1] == BLOCK
            assert arr.shape[0] == meta["counts"][lang][split]["chunks"] > 0
            assert ctx.logged()[f"{lang}/{split}_chunks"] == float(arr.shape[0])
            assert arr.min() >= 0 and arr.max() < 200
    features = datasets.load_from_disk(str(out / "xx"))["train"].features  # what a researcher sees
    assert features["input_ids"].length == BLOCK and features["input_ids"].feature.dtype == "int32"
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    assert (meta["block_size"], meta["vocab_size"], meta["pad_token_id"], meta["mask_token_id"]) == (BLOCK, 200, 1, 199)
    assert meta["languages"] == ["xx", "zh"] and meta["doc_boundary"] == "special"
    assert "even" in meta["test_split"] and "odd" in meta["test_split"]  # the rule, stated in the artifact
    assert meta["counts"]["xx"]["select"]["docs"] == 3 and meta["counts"]["xx"]["report"]["docs"] == 2
    assert meta["counts"]["zh"]["select"]["docs"] == 2 and meta["counts"]["zh"]["report"]["docs"] == 1


@pytest.mark.parametrize("split", ["train", "select", "report"])
def test_chunks_are_the_concatenated_documents_remainder_dropped(
    dataset: tuple[Path, dict[str, Any], FakeContext], corpus_dir: Path, tokenizer_dir: Path, split: str
) -> None:
    out, meta, _ = dataset
    tok = load_tok(tokenizer_dir)
    for lang in ("xx", "zh"):
        stream = expected_stream(tok, corpus_dir, lang, split, "special")
        n = len(stream) // BLOCK
        arr = chunks(out, lang, split)
        np.testing.assert_array_equal(arr, np.asarray(stream[: n * BLOCK], dtype=np.int32).reshape(n, BLOCK))
        counts = meta["counts"][lang][split]
        assert counts["tokens"] == len(stream)
        assert counts["dropped_tokens"] == len(stream) % BLOCK
    assert meta["counts"]["xx"]["train"]["dropped_tokens"] > 0 or meta["counts"]["xx"]["select"]["dropped_tokens"] > 0


def test_split_test_documents_alternates_deterministically() -> None:
    """Even positions -> selection half, odd -> reporting half: deterministic, disjoint, complete,
    sizes differing by at most one, and every run of consecutive documents (a book, a genre) lands in
    both halves."""
    docs = [f"{book}{i}" for book in "ABCDEFG" for i in range(5)]  # 7 "books" of 5 chapters, in order
    halves = split_test_documents(docs)
    assert halves == split_test_documents(list(docs))  # deterministic
    assert set(halves) == {"select", "report"}
    select, report = halves["select"], halves["report"]
    assert not set(select) & set(report) and sorted(select + report) == sorted(docs)
    assert (len(select), len(report)) == (18, 17)
    assert select == docs[0::2] and report == docs[1::2]  # corpus order kept inside each half
    for book in "ABCDEFG":
        assert any(d.startswith(book) for d in select) and any(d.startswith(book) for d in report)
    for n in range(2, 12):
        sizes = [len(v) for v in split_test_documents(list(range(n))).values()]
        assert abs(sizes[0] - sizes[1]) <= 1 and sum(sizes) == n
    with pytest.raises(ValueError, match="at least 2 test documents"):
        split_test_documents(["only one"])

def test_no_test_chunk_contains_training_text(
    dataset: tuple[Path, dict[str, Any], FakeContext], tokenizer_dir: Path
) -> None:
    out, _, _ = dataset
    tok = load_tok(tokenizer_dir)
    train_text = tok.decode(chunks(out, "xx", "train").ravel().tolist(), skip_special_tokens=True)
    assert LATIN.search(train_text) and not CYRILLIC.search(train_text)
    for half in ("select", "report"):
        test_text = tok.decode(chunks(out, "xx", half).ravel().tolist(), skip_special_tokens=True)
        assert CYRILLIC.search(test_text) and not LATIN.search(test_text)


def test_eos_boundary(tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path) -> None:
    out, meta, _ = tokenize(tmp_path, corpus_dir, tokenizer_dir, doc_boundary="eos")
    tok = load_tok(tokenizer_dir)
    stream = expected_stream(tok, corpus_dir, "zh", "train", "eos")
    n = len(stream) // BLOCK
    np.testing.assert_array_equal(chunks(out, "zh", "train").ravel(), np.asarray(stream[: n * BLOCK]))
    assert 0 not in stream and stream.count(2) == 8  # no <s>, one </s> per document


def test_caps_take_a_seeded_ordered_subset(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, dataset: tuple[Path, dict[str, Any], FakeContext]
) -> None:
    full = chunks(dataset[0], "xx", "train")
    out, meta, _ = tokenize(
        tmp_path / "a", corpus_dir, tokenizer_dir, max_chunks_per_language=3, max_test_chunks_per_language=2
    )
    capped = chunks(out, "xx", "train")
    assert capped.shape == (3, BLOCK)
    for half in ("select", "report"):  # the test cap is shared evenly by the halves: ceil(2 / 2) each
        assert meta["counts"]["xx"][half]["chunks_available"] > 1
        assert chunks(out, "xx", half).shape == (1, BLOCK)
    assert meta["counts"]["xx"]["train"]["chunks_available"] == len(full)
    rows = [int(np.flatnonzero((full == row).all(axis=1))[0]) for row in capped]
    assert rows == sorted(rows) and len(set(rows)) == 3
    again, _, _ = tokenize(
        tmp_path / "b", corpus_dir, tokenizer_dir, max_chunks_per_language=3, max_test_chunks_per_language=2
    )
    assert tree_bytes(again) == tree_bytes(out)  # every file, state.json (the fingerprint) included
    other, _, _ = tokenize(tmp_path / "c", corpus_dir, tokenizer_dir, seed=1, max_chunks_per_language=3)
    assert tree_bytes(other / "xx" / "train") != tree_bytes(out / "xx" / "train")


def test_zero_chunks_raise_naming_the_parameter(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, dataset: tuple[Path, dict[str, Any], FakeContext]
) -> None:
    counts = dataset[1]["counts"]["xx"]
    big = counts["select"]["tokens"] + 1
    assert counts["train"]["tokens"] >= big  # train still gives a chunk: the error is about a test half
    with pytest.raises(ValueError, match=r"xx/select has \d+ tokens, fewer than block_size=\d+.*lower block_size"):
        tokenize(tmp_path, corpus_dir, tokenizer_dir, block_size=big)


def test_a_single_test_document_cannot_be_halved(tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path) -> None:
    docs = {"xx": {"train": [r["text"] for r in read_docs(corpus_dir, "xx", "train")],
                   "test": [read_docs(corpus_dir, "xx", "test")[0]["text"]]}}
    corpus = write_corpus(tmp_path / "c", docs)
    with pytest.raises(ValueError, match=r"xx has 1 test document.*corpus.*test_docs"):
        tokenize(tmp_path / "out", corpus, tokenizer_dir)
