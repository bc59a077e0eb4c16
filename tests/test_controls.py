"""Language-level controls: token overlap on a hand-built tokenizer, URIEL syntactic distances."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from stagekit import FakeContext, make_input, run_stage

from stages.controls import LANGUAGE_DISTANCE, TOKEN_OVERLAP, sentence_overlap, token_overlap, uriel_code

WORDS = ["the", "house", "casa", "la", "haus", "das", "ok", "taxi", "hotel"]


def make_tokenizer(root: Path) -> Path:
    """Word-level tokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3, the words, <mask>; template <s> A </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS, "<mask>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                  cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    tok.save_pretrained(root)
    return root


def write_parallel(root: Path, rows: list[dict], languages: list[str]) -> Path:
    from stages.formats.parallel import write_parallel as write_rows

    root.mkdir(parents=True, exist_ok=True)
    write_rows(root, languages, rows)
    (root / "meta.json").write_text(json.dumps({"languages": languages, "n": len(rows), "source": "file"}))
    return root


ROWS = [
    # es shares {ok} of {la, casa, ok}: 1/3; de shares {taxi, hotel} of {das, haus, taxi, hotel}: 1/2
    {"id": "0", "en": "the house ok taxi hotel", "es": "la casa ok ok", "de": "das haus taxi hotel"},
    # es: {hotel} of {la, hotel}: 1/2 (an unknown word is <unk>, excluded); de: nothing shared: 0
    {"id": "1", "en": "hotel <mask> blorp", "es": "la hotel zzz", "de": "das haus blorp"},
    # de has only unknown words: no id left, the sentence is skipped for de
    {"id": "2", "en": "the taxi", "es": "taxi", "de": "qqq rrr"},
]


def test_sentence_overlap():
    assert sentence_overlap({1, 2, 3}, {2, 3, 4, 5}) == 0.5
    assert sentence_overlap({1}, set()) is None


def test_token_overlap_stage(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    par = write_parallel(tmp_path / "par", ROWS, ["en", "es", "de"])
    ctx = FakeContext(tmp_path / "run")
    inputs = {"tokenizer": make_input(tok, "tokenizer"), "parallel": make_input(par, "parallel-corpus")}
    meta = run_stage(TOKEN_OVERLAP, {}, ctx, inputs)["metrics"]
    doc = json.loads((ctx.output_dir("metrics") / "token_overlap.json").read_text())
    assert set(doc) == {"reference", "languages", "overlap", "n"}
    assert doc["reference"] == "en" and doc["languages"] == ["en", "es", "de"] and doc["n"] == 3
    assert doc["overlap"]["en"] == 1.0
    assert doc["overlap"]["es"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert doc["overlap"]["de"] == pytest.approx((1 / 2 + 0) / 2)
    assert meta["sentences_used"] == {"en": 3, "es": 3, "de": 2}
    # another reference
    ctx2 = FakeContext(tmp_path / "run2")
    run_stage(TOKEN_OVERLAP, {"reference": "de"}, ctx2, inputs)
    doc2 = json.loads((ctx2.output_dir("metrics") / "token_overlap.json").read_text())
    assert doc2["overlap"]["de"] == 1.0 and doc2["overlap"]["en"] == pytest.approx((2 / 5 + 0 + 0) / 3)
    with pytest.raises(ValueError, match="reference 'fr'"):
        run_stage(TOKEN_OVERLAP, {"reference": "fr"}, FakeContext(tmp_path / "run3"), inputs)


def test_token_overlap_excludes_special_tokens(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "tok")))
    # identical texts made of special tokens only: nothing to compare
    value, used = token_overlap(tok, ["<mask> <unk>"], ["<mask> zzz"])
    assert used == 0 and value != value  # NaN
    assert token_overlap(tok, ["the house"], ["house the the"]) == (1.0, 1)


# --- syntactic distance ---------------------------------------------------------------------------

LANGS = ["en", "es", "ru", "de", "zh", "ar", "hi", "ur"]


@pytest.fixture(scope="module")
def distances(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    pytest.importorskip("urielplus")
    ctx = FakeContext(tmp_path_factory.mktemp("dist"))
    meta = run_stage(LANGUAGE_DISTANCE, {"languages": LANGS}, ctx)["metrics"]
    doc = json.loads((ctx.output_dir("metrics") / "language_distance.json").read_text())
    return doc, dict(meta)


def test_language_distance_matrix(distances):
    doc, meta = distances
    assert set(doc) == {"method", "languages", "syntactic", "reference"}
    assert doc["languages"] == LANGS and doc["reference"] == "en" and "urielplus" in doc["method"]
    assert "zh=cmn" in doc["method"] and meta["iso3"]["ar"] == "arb"
    m = doc["syntactic"]
    idx = {lang: i for i, lang in enumerate(LANGS)}
    for i in range(len(LANGS)):
        assert m[i][i] == 0.0
        for j in range(len(LANGS)):
            assert m[i][j] == m[j][i] and (i == j or 0.0 < m[i][j] <= 1.0)

    def d(a: str, b: str) -> float:
        return m[idx[a]][idx[b]]

    assert d("en", "de") < d("en", "zh")
    assert d("en", "es") < d("en", "ar")
    assert d("hi", "ur") == min(d("hi", x) for x in LANGS if x != "hi")  # Hindi and Urdu: one grammar
    assert d("en", "de") == pytest.approx(0.358, abs=0.05)  # urielplus 1.3.2: 0.3582


def test_language_distance_options_and_errors(tmp_path, distances):
    doc, _ = distances
    ctx = FakeContext(tmp_path / "a")
    run_stage(LANGUAGE_DISTANCE, {"languages": ["en", "zh"], "iso3": {"zh": "zho"}, "metric": "cosine"}, ctx)
    doc2 = json.loads((ctx.output_dir("metrics") / "language_distance.json").read_text())
    assert "zh=zho" in doc2["method"] and "cosine" in doc2["method"]
    assert doc2["syntactic"][0][1] != doc["syntactic"][0][4]
    assert uriel_code("en") == "eng" and uriel_code("yue") == "yue" and uriel_code("zh", {"zh": "zho"}) == "zho"
    with pytest.raises(ValueError, match="no ISO 639-3 code"):
        uriel_code("xx")
    with pytest.raises(ValueError, match="URIEL has no language"):
        run_stage(LANGUAGE_DISTANCE, {"languages": ["en", "qqq"]}, FakeContext(tmp_path / "b"))
    with pytest.raises(ValueError, match="reference 'fr'"):
        run_stage(LANGUAGE_DISTANCE, {"languages": ["en", "de"], "reference": "fr"}, FakeContext(tmp_path / "c"))


def test_quiet_root_logger_undoes_basic_config(monkeypatch):
    from stages.controls import _quiet_root_logger

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    with _quiet_root_logger():
        logging.basicConfig(level=logging.INFO)  # what urielplus does on import
        assert root.handlers
    assert root.handlers == [] and root.level == logging.WARNING
