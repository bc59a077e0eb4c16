"""Raw text per language and split (artifact type ``corpus``): written by ``corpus``; read by ``tokenizer``
(train split) and ``tokenize`` (both splits).

Layout::

    <lang>/      a ``datasets.DatasetDict`` saved with ``save_to_disk`` (:mod:`.hf`): splits ``train`` and
                 ``test`` (``<lang>/<split>/``), one row per document (a :class:`Doc`: columns ``id``,
                 ``text``), in source order
    meta.json    languages, source, seed, doc/char counts per language and split

Open one language with ``datasets.load_from_disk(f"{artifact}/{lang}")``. The split is by document, made
by the corpus stage; readers take the languages in meta.json's order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stages._io import META_FILE, read_json
from stages.formats import hf

CORPUS_SPLITS: tuple[str, str] = ("train", "test")


@dataclass(frozen=True)
class Doc:
    """One document: a stable id (unique within a language) and its text."""

    id: str
    text: str


def write_language(out: Path, lang: str, splits: Mapping[str, Sequence[Doc]]) -> None:
    """Write one language's splits (``{split: documents}``) as ``out/<lang>/``, a ``DatasetDict``."""
    datasets = {}
    for split, docs in splits.items():
        columns = {"id": hf.string_array(d.id for d in docs), "text": hf.string_array(d.text for d in docs)}
        datasets[split] = hf.make_dataset(columns)
    hf.save_splits(out / lang, datasets)


def corpus_languages(corpus_dir: Path) -> list[str]:
    """The languages of a ``corpus`` artifact, in the order the corpus stage wrote them."""
    meta_path = corpus_dir / META_FILE
    if meta_path.is_file():
        langs = read_json(meta_path).get("languages")
        if isinstance(langs, list) and all(isinstance(x, str) for x in langs):
            return list(langs)
    langs = sorted(p.name for p in corpus_dir.iterdir() if p.is_dir() and hf.is_saved(p))
    if not langs:
        raise ValueError(f"{corpus_dir} is not a corpus artifact: no <lang>/{hf.DATASET_DICT_FILE} inside")
    return langs


def corpus_split_path(corpus_dir: Path, lang: str, split: str) -> Path:
    """Path of one split of one language in a ``corpus`` artifact (must exist)."""
    path = corpus_dir / lang / split
    if hf.is_saved(path):
        return path
    if (corpus_dir / lang / f"{split}.jsonl").is_file():
        raise ValueError(
            f"corpus artifact {corpus_dir} holds {lang}/{split}.jsonl of a corpus stage before version 2, not "
            f"{lang}/{split}/ (a datasets directory); re-run the corpus stage and the stages after it"
        )
    raise ValueError(f"corpus artifact {corpus_dir} has no {lang}/{split} (a datasets directory written by the corpus stage)")


def read_texts(corpus_dir: Path, lang: str, split: str) -> Iterator[str]:
    """The document texts of one split of one language, streamed in corpus order (the split must exist:
    checked now, not when the texts are read)."""
    return hf.string_column(hf.load(corpus_split_path(corpus_dir, lang, split)), "text")
