"""Raw text per language and split (artifact type ``corpus``): written by ``corpus``; read by ``tokenizer``
(train split) and ``tokenize`` (both splits).

Layout::

    <lang>/train.jsonl   one {"id": ..., "text": ...} per line (a :class:`Doc`), in source order
    <lang>/test.jsonl
    meta.json            languages, source, seed, doc/char counts per language and split

The split is by document, made by the corpus stage; readers take the languages in meta.json's order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stages._io import META_FILE, read_json, read_jsonl, write_jsonl

CORPUS_SPLITS: tuple[str, str] = ("train", "test")


@dataclass(frozen=True)
class Doc:
    """One document: a stable id (unique within a language) and its text."""

    id: str
    text: str


def write_split(out: Path, lang: str, split: str, docs: Iterable[Doc]) -> int:
    """Write one language's split as JSON lines; return how many documents were written."""
    return write_jsonl(out / lang / f"{split}.jsonl", ({"id": d.id, "text": d.text} for d in docs))


def corpus_languages(corpus_dir: Path) -> list[str]:
    """The languages of a ``corpus`` artifact, in the order the corpus stage wrote them."""
    meta_path = corpus_dir / META_FILE
    if meta_path.is_file():
        langs = read_json(meta_path).get("languages")
        if isinstance(langs, list) and all(isinstance(x, str) for x in langs):
            return list(langs)
    langs = sorted(p.name for p in corpus_dir.iterdir() if (p / "train.jsonl").is_file())
    if not langs:
        raise ValueError(f"{corpus_dir} is not a corpus artifact: no <lang>/train.jsonl inside")
    return langs


def corpus_split_path(corpus_dir: Path, lang: str, split: str) -> Path:
    """Path of one split of one language in a ``corpus`` artifact (must exist)."""
    path = corpus_dir / lang / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"corpus artifact {corpus_dir} has no {lang}/{split}.jsonl")
    return path


def read_texts(corpus_dir: Path, lang: str, split: str) -> Iterator[str]:
    """The document texts of one split of one language, streamed in corpus order (the file must exist:
    checked now, not when the texts are read)."""
    path = corpus_split_path(corpus_dir, lang, split)
    return (str(rec["text"]) for rec in read_jsonl(path))
