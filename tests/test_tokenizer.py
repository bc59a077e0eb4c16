"""Tests of the ``tokenizer`` stage: a small trained tokenizer, reloaded with AutoTokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from stagekit import FakeContext, make_input, run_stage, sentences, write_corpus

from stages.tokenizer import TOKENIZER

VOCAB = 300


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny three-language corpus (en, ru, zh) of pseudo-random sentences."""
    docs = {
        lang: {
            "train": [" ".join(sentences(lang, 10, seed=d)) for d in range(30)],
            "test": [" ".join(sentences(lang, 10, seed=100 + d)) for d in range(3)],
        }
        for lang in ("en", "ru", "zh")
    }
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs)


def train(tmp: Path, corpus: Path | None, **params: Any) -> tuple[Path, dict[str, Any], FakeContext]:
    """Run the tokenizer stage; return its output dir, metadata and context."""
    ctx = FakeContext(tmp)
    inputs = {"corpus": make_input(corpus, "corpus")} if corpus is not None else {}
    meta = run_stage(TOKENIZER, {"vocab_size": VOCAB, **params}, ctx, inputs)
    assert meta is not None
    return ctx.output_dir("tokenizer"), dict(meta["tokenizer"]), ctx


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> tuple[Path, dict[str, Any], FakeContext]:
    return train(tmp_path_factory.mktemp("tok"), corpus_dir)


def load(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_reloads_with_autotokenizer_and_xlmr_special_ids(trained: tuple[Path, dict[str, Any], FakeContext]) -> None:
    out, meta, ctx = trained
    tok = load(out)
    assert len(tok) == VOCAB
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, VOCAB - 1]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, VOCAB - 1)
    assert tok.model_max_length == 512
    assert meta["vocab_size"] == VOCAB and meta["mask_token_id"] == VOCAB - 1
    assert meta["languages"] == ["en", "ru", "zh"]
    assert ctx.logged()["vocab_size"] == float(VOCAB)
    assert meta["test_split"]["ru"]["unk_rate"] == 0.0
    assert meta["test_split"]["en"]["chars_per_token"] > 1.5  # merges were learnt, not characters only
    assert ctx.logged()["zh/test_unk_rate"] == 0.0
    ids = tok("the house")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
    pair = tok("the house", "дом")["input_ids"]
    assert pair.count(2) == 3 and pair[0] == 0


def test_round_trip_and_normalisation(trained: tuple[Path, dict[str, Any], FakeContext]) -> None:
    tok = load(trained[0])
    for lang in ("en", "ru", "zh"):
        text = " ".join(sentences(lang, 3, seed=999))
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # NFKC (full-width letters) and whitespace runs are normalised away
    assert tok("the   house")["input_ids"] == tok("ｔｈｅ house")["input_ids"]
    # the mask token is recognised inside text
    assert tok.mask_token_id in tok("the <mask> house")["input_ids"]


def test_trained_tokenizer_is_byte_deterministic(
    tmp_path: Path, corpus_dir: Path, trained: tuple[Path, dict[str, Any], FakeContext]
) -> None:
    out, meta, _ = trained
    again, meta2, _ = train(tmp_path, corpus_dir)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tokenizer.json", "tokenizer_config.json"]
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert meta2 == meta


def test_language_balance_caps_characters(tmp_path: Path, corpus_dir: Path) -> None:
    _, meta, _ = train(tmp_path, corpus_dir, max_chars_per_language=500)
    assert meta["train_chars"] == {"en": 500, "ru": 500, "zh": 500}


def test_character_coverage_turns_rare_characters_into_unk(tmp_path: Path) -> None:
    common = [" ".join(sentences("en", 10, seed=d)) for d in range(20)]
    corpus = write_corpus(tmp_path / "c", {"en": {"train": [*common, "rare: ǂ"], "test": common[:1]}})
    _, meta, _ = train(tmp_path / "a", corpus, character_coverage=0.999)
    assert meta["characters_kept"] < meta["characters_seen"]
    tok = load(tmp_path / "a" / "outputs" / "tokenizer")
    assert tok.unk_token_id in tok("ǂ")["input_ids"]
    _, meta_all, _ = train(tmp_path / "b", corpus, character_coverage=1.0)
    assert meta_all["characters_kept"] == meta_all["characters_seen"] == meta["characters_seen"]
    assert 3 not in load(tmp_path / "b" / "outputs" / "tokenizer")("ǂ")["input_ids"]


def test_unigram_model(tmp_path: Path, corpus_dir: Path) -> None:
    out, meta, _ = train(tmp_path, corpus_dir, model="unigram")
    tok = load(out)
    assert meta["model"] == "unigram"
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, len(tok) - 1]
    assert len(tok) <= VOCAB
    text = " ".join(sentences("ru", 3, seed=5))
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_pretrained_local_path_is_copied(tmp_path: Path, trained: tuple[Path, dict[str, Any], FakeContext]) -> None:
    src = trained[0]
    out, meta, _ = train(tmp_path, None, pretrained=str(src))
    assert meta["pretrained"] == str(src) and meta["vocab_size"] == VOCAB
    text = " ".join(sentences("zh", 2, seed=1))
    assert load(out)(text)["input_ids"] == load(src)(text)["input_ids"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="corpus"):
        train(tmp_path / "a", None)
    with pytest.raises(ValueError, match="pretrained"):
        train(tmp_path / "b", None, pretrained=str(tmp_path / "does-not-exist"))
    with pytest.raises(ValueError, match="vocab_size"):
        train(tmp_path / "c", None, vocab_size=3)
