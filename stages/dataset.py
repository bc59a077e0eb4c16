"""Stage ``tokenize``: fixed-length token chunks per language and split, for masked-LM training.

As in the original (the ``run_mlm`` recipe): every document is tokenized without truncation, the
token sequences are concatenated and cut into chunks of ``block_size`` tokens, the remainder is
dropped. Unlike the original, train chunks come only from the corpus' train documents and test chunks
only from its test documents (the corpus stage splits by document, before chunking).

Document boundaries (``doc_boundary``):

- ``special`` (default): each document carries the tokenizer's own special tokens (``<s> doc </s>``
  for XLM-R), exactly what the original got from ``tokenizer(text)`` before ``group_texts``. The
  model sees document starts/ends as in pre-training, and the MLM collator never masks them.
- ``eos``: no per-document template, one ``</s>`` (sep/eos) after each document.
- ``none``: plain concatenation.

**Selection and reporting halves.** The test documents of each language are split, before
chunking, into a *selection* half and a *reporting* half (:func:`split_test_documents`): the test
document at position ``i`` of the corpus' test split (corpus order) goes to the selection half when
``i`` is even, to the reporting half when ``i`` is odd. Every decision that looks at held-out text
(the best training checkpoint, head importance, the pruning threshold) uses only the selection
half; every number reported as a result (perplexity before/after fine-tuning, ``cross_eval``) uses
only the reporting half, so the reported numbers are not biased by the choices made on them.
Alternating positions, rather than a hash, gives halves whose sizes differ by at most one document
and puts every run of consecutive documents (a book of the Bible, an article's neighbours) in both
halves, so neither half is one genre. The rule needs no seed; for the Bible, where the translations
hold out the same chapters in the same order, the halves are the same chapters in every language.
Each half is chunked on its own, so no chunk straddles the two.

Over-long corpora are capped with a seeded random subset of chunks (kept in corpus order); the test
cap ``max_test_chunks_per_language`` is shared evenly: each half keeps at most ``ceil(cap / 2)``.

Output ``dataset`` (type ``dataset``): per language a ``datasets.DatasetDict`` saved with ``save_to_disk``
(``<lang>/``, splits ``train``, ``select``, ``report``, column ``input_ids``) and ``meta.json``, laid out,
written and read by :mod:`stages.formats.dataset` (versions 1 and 2 wrote ``.npy`` files).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageInterrupted, StageParams, stage
from stages._io import effective_seed, get_input, progress
from stages.formats.corpus import corpus_languages, read_texts
from stages.formats.dataset import SPLITS, TEST_HALVES, write_dataset_meta, write_language

T = TypeVar("T")

BATCH_DOCS = 256
TEST_SPLIT_RULE = (
    "test documents in corpus order: even positions (0, 2, 4, ...) -> select (model selection, head "
    "importance, pruning threshold), odd positions (1, 3, 5, ...) -> report (reported perplexities); "
    "each half chunked on its own"
)
# The seed word of each split's chunk cap: train keeps version 1's word (its chunks are unchanged);
# the halves take words the old test split (1) never used.
_CAP_WORD = {"train": 0, "select": 2, "report": 3}


class TokenizeParams(StageParams):
    """Parameters of the ``tokenize`` stage."""

    block_size: int = Field(512, ge=2, description="Tokens per chunk (the model context; 512 as in the original).")
    max_chunks_per_language: int | None = Field(
        100_000, ge=1, description="Cap on train chunks per language (seeded subset); None: all."
    )
    max_test_chunks_per_language: int | None = Field(
        3_000,
        ge=1,
        description="Cap on test chunks per language (seeded subset), shared by the two halves: each "
        "of select/report keeps at most ceil(cap / 2); None: all.",
    )
    doc_boundary: Literal["special", "eos", "none"] = Field(
        "special",
        description="special: the tokenizer's own <s> doc </s> per document (as the original); "
        "eos: one </s> after each document; none: plain concatenation.",
    )
    seed: int | None = Field(None, description="Seed of the chunk subset; None: the job's seed.")


def split_test_documents(docs: Sequence[T]) -> dict[str, list[T]]:
    """The selection and reporting halves of a language's test documents (given in corpus order).

    Position ``i`` goes to ``"select"`` when even and to ``"report"`` when odd: deterministic,
    disjoint, complete, the sizes differ by at most one, and consecutive documents (one book, one
    source) are spread over both halves. Needs at least two documents.
    """
    if len(docs) < 2:
        raise ValueError(f"need at least 2 test documents to split them into a selection and a reporting half, got {len(docs)}")
    return {"select": list(docs[0::2]), "report": list(docs[1::2])}


def split_cap(cap: int | None, split: str) -> int | None:
    """The chunk cap of one split: train's own cap; each test half gets ``ceil(test cap / 2)``."""
    if cap is None or split == "train":
        return cap
    return math.ceil(cap / 2)


def _batched(texts: Iterable[str]) -> Iterator[list[str]]:
    """``texts`` in batches of at most ``BATCH_DOCS``."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def token_stream(tokenizer: Any, texts: Iterable[str], doc_boundary: str, desc: str) -> tuple[Any, int]:
    """All ``texts`` (documents) tokenized and concatenated (int32), and the number of documents."""
    import numpy as np

    special = doc_boundary == "special"
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if doc_boundary == "eos" and eos is None:
        raise ValueError("doc_boundary=eos: the tokenizer has no sep/eos token; use 'special' or 'none'")
    parts: list[Any] = []
    n_docs = 0
    for batch in progress(_batched(texts), desc=desc, unit="batch"):
        enc = tokenizer(batch, add_special_tokens=special, return_attention_mask=False, verbose=False)
        for ids in enc["input_ids"]:
            parts.append(np.asarray(ids, dtype=np.int32))
            if doc_boundary == "eos":
                parts.append(np.asarray([eos], dtype=np.int32))
        n_docs += len(batch)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream, n_docs


def chunk(stream: Any, block_size: int) -> Any:
    """Cut a 1-D token array into ``[n, block_size]`` rows, dropping the remainder."""
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size)


def cap_chunks(chunks: Any, cap: int | None, seed: int, lang: str, split: str) -> Any:
    """A seeded random subset of at most ``cap`` rows, in their original order."""
    import numpy as np

    if cap is None or len(chunks) <= cap:
        return chunks
    key = [seed, zlib.crc32(lang.encode()), _CAP_WORD[split]]
    keep = np.sort(np.random.default_rng(key).choice(len(chunks), size=cap, replace=False))
    return chunks[keep]


def _zero_chunk_error(lang: str, split: str, n_tokens: int, block_size: int) -> ValueError:
    """The error for a language split too short to give a single chunk."""
    source = "train" if split == "train" else f"test (the {split} half of the test documents)"
    return ValueError(
        f"tokenize: {lang}/{split} has {n_tokens} tokens, fewer than block_size={block_size}, so it "
        f"yields no chunk; lower block_size, or give the corpus more {source} text (corpus params "
        "max_docs_per_language, test_fraction/test_docs)"
    )


def language_split_texts(corpus_dir: Path, lang: str) -> Iterator[tuple[str, Iterable[str]]]:
    """``(chunk split, document texts)`` of one language: the train documents (streamed), then the
    selection and reporting halves of the test documents (:func:`split_test_documents`)."""
    yield "train", read_texts(corpus_dir, lang, "train")
    test = list(read_texts(corpus_dir, lang, "test"))
    if len(test) < 2:
        raise ValueError(
            f"tokenize: {lang} has {len(test)} test document(s); the test documents are split alternately into a "
            "selection and a reporting half, so at least 2 are needed; give the corpus stage more test "
            "documents (test_docs, test_fraction)"
        )
    halves = split_test_documents(test)
    for half in TEST_HALVES:
        yield half, halves[half]


def tokenize_language(
    tokenizer: Any, corpus_dir: Path, lang: str, params: TokenizeParams, seed: int, out: Path
) -> dict[str, dict[str, float]]:
    """Chunk one language into ``out/<lang>/`` (splits train, select, report); return counts per split."""
    import numpy as np

    counts: dict[str, dict[str, float]] = {}
    kept_splits: dict[str, Any] = {}
    for split, texts in language_split_texts(corpus_dir, lang):
        stream, n_docs = token_stream(tokenizer, texts, params.doc_boundary, f"tokenize[{lang}/{split}]")
        chunks = chunk(stream, params.block_size)
        if len(chunks) == 0:
            raise _zero_chunk_error(lang, split, len(stream), params.block_size)
        cap = params.max_chunks_per_language if split == "train" else params.max_test_chunks_per_language
        kept = kept_splits[split] = cap_chunks(chunks, split_cap(cap, split), seed, lang, split)
        unk = tokenizer.unk_token_id
        counts[split] = {
            "docs": n_docs,
            "tokens": int(len(stream)),
            "chunks_available": int(len(chunks)),
            "chunks": int(len(kept)),
            "dropped_tokens": int(len(stream) - len(chunks) * params.block_size),
            "unk_rate": float(np.mean(stream == unk)) if unk is not None else 0.0,
        }
    write_language(out, lang, kept_splits)
    return counts


def _load_tokenizer(path: Path) -> Any:
    """Load the tokenizer artifact with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def dataset_meta(tokenizer: Any, params: TokenizeParams, languages: list[str], counts: dict) -> dict[str, Any]:
    """meta.json / artifact metadata of a dataset."""
    ids = {f"{n}_token_id": getattr(tokenizer, f"{n}_token_id", None) for n in ("pad", "mask", "bos", "eos", "unk")}
    return {
        "block_size": params.block_size,
        "vocab_size": len(tokenizer),
        **ids,
        "doc_boundary": params.doc_boundary,
        "dtype": "int32",
        "languages": languages,
        "splits": list(SPLITS),
        "test_split": TEST_SPLIT_RULE,
        "test_chunk_cap_per_half": split_cap(params.max_test_chunks_per_language, "select"),
        "counts": counts,
    }


@stage(
    "tokenize",
    params=TokenizeParams,
    inputs={"corpus": Input(type="corpus"), "tokenizer": Input(type="tokenizer")},
    outputs={"dataset": "dataset"},
    version="3",  # 2: the test documents split into select / report halves; 3: datasets directories, not .npy
)
def tokenize_stage(params: TokenizeParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Tokenize the corpus and cut it into fixed-length chunks per language and split."""
    corpus = get_input(inputs, "corpus")
    tok_input = get_input(inputs, "tokenizer")
    if corpus is None or tok_input is None:  # get_input raises for required inputs
        raise ValueError("tokenize: needs both a 'corpus' and a 'tokenizer' input")
    tokenizer = _load_tokenizer(tok_input.path)
    if len(tokenizer) > 2**31 - 1:
        raise ValueError(f"tokenizer vocabulary of {len(tokenizer)} does not fit int32 ids")
    seed = effective_seed(ctx.seed, params.seed)
    out = ctx.output_dir("dataset")
    languages = corpus_languages(corpus.path)
    counts: dict[str, Any] = {}
    for lang in progress(languages, desc="tokenize", unit="language", ctx=ctx):
        if ctx.stop_requested.is_set():
            raise StageInterrupted("tokenize: stop requested (nothing to checkpoint, the stage reruns)")
        counts[lang] = tokenize_language(tokenizer, corpus.path, lang, params, seed, out)
        ctx.log({f"{lang}/{split}_{k}": float(v) for split, c in counts[lang].items() for k, v in c.items()})
    meta = dataset_meta(tokenizer, params, languages, counts)
    write_dataset_meta(out, meta)
    return {"dataset": meta}


TOKENIZE: StageDef = tokenize_stage
