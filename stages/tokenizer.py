"""Stage ``tokenizer``: a tokenizer directory loadable with ``AutoTokenizer.from_pretrained(path)``.

Either copies a pretrained tokenizer (``pretrained``: a hub name such as ``FacebookAI/xlm-roberta-base``
or a local directory) or trains an XLM-R-like tokenizer with the ``tokenizers`` library on the
**train** split of every language of the input corpus:

- model: Unigram (as XLM-R's SentencePiece model) or SentencePiece-style BPE;
- normaliser: NFKC, whitespace runs collapsed to one space, ends stripped;
- pre-tokeniser/decoder: Metaspace (``▁``, prefix space always added);
- special tokens in XLM-R's id order: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3 and ``<mask>``
  last (id ``vocab_size - 1``, ``lstrip=True`` as in XLM-R);
- post-processor: ``<s> A </s>`` and ``<s> A </s> </s> B </s>``.

Languages are balanced by taking at most ``max_chars_per_language`` characters of each language's
train documents (whole documents, in corpus order), so that small languages get vocabulary.

The result is saved as a generic fast tokenizer (``TokenizersBackend`` / ``PreTrainedTokenizerFast``),
not as ``XLMRobertaTokenizer``: in transformers 5 that class rebuilds its normaliser and
pre-tokeniser in ``__init__`` when loading (dropping the NFKC normaliser), so the loaded tokenizer
would not be the trained one. The generic class reloads ``tokenizer.json`` exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageParams, stage
from stages._io import get_input, optional_input
from stages.formats.corpus import corpus_languages, read_texts

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
EVAL_CHARS = 200_000  # characters of each test split used for the <unk> rate / chars-per-token check


class TokenizerParams(StageParams):
    """Parameters of the ``tokenizer`` stage."""

    pretrained: str | None = Field(
        None,
        description="Hub name or local directory of a tokenizer to copy (e.g. FacebookAI/xlm-roberta-base); "
        "None: train a new one on the corpus.",
    )
    model: Literal["bpe", "unigram"] = Field(
        "bpe",
        description="Subword model: SentencePiece-style BPE (deterministic, fast) or Unigram (XLM-R's; "
        "the tokenizers Unigram trainer is not byte-deterministic across processes).",
    )
    vocab_size: int = Field(4000, ge=32, description="Total vocabulary size, special tokens and <mask> included.")
    max_chars_per_language: int | None = Field(
        2_000_000, ge=1, description="Train on at most this many characters per language (balance); None: all."
    )
    character_coverage: float = Field(
        0.9995,
        gt=0.0,
        le=1.0,
        description="Keep the most frequent characters covering this fraction of the training text "
        "(SentencePiece's default); rarer characters become <unk>. 1.0: keep all.",
    )
    max_piece_length: int = Field(16, ge=1, description="unigram: longest piece in characters.")
    min_frequency: int = Field(2, ge=1, description="bpe: minimum pair frequency for a merge.")
    model_max_length: int = Field(512, ge=1, description="model_max_length stored in the tokenizer config.")


def _training_texts(corpus_dir: Path, languages: list[str], max_chars: int | None) -> tuple[list[str], dict[str, int]]:
    """Train-split documents of every language, at most ``max_chars`` characters per language."""
    texts: list[str] = []
    chars: dict[str, int] = {}
    for lang in languages:
        used = 0
        for text in read_texts(corpus_dir, lang, "train"):
            if max_chars is not None and used >= max_chars:
                break
            if max_chars is not None and used + len(text) > max_chars:
                text = text[: max_chars - used]
            texts.append(text)
            used += len(text)
        chars[lang] = used
        if used == 0:
            raise ValueError(f"corpus language {lang!r} has no training text to train a tokenizer on")
    return texts, chars


def covered_characters(texts: list[str], coverage: float) -> tuple[set[str], int]:
    """The most frequent characters (whitespace excluded) covering ``coverage`` of all characters.

    Returns the kept set (ties broken by code point, so it is deterministic) and the number of
    distinct characters seen.
    """
    from collections import Counter

    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    for ws in [c for c in counts if c.isspace()]:
        del counts[ws]
    total = sum(counts.values())
    kept: set[str] = set()
    running = 0
    for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if running >= coverage * total:
            break
        kept.add(ch)
        running += n
    return kept, len(counts)


def drop_rare_characters(texts: list[str], kept: set[str]) -> list[str]:
    """Remove characters outside ``kept`` (whitespace stays) so the trainer never sees them."""
    return ["".join(c for c in t if c in kept or c.isspace()) for t in texts]


def build_tokenizer(texts: list[str], params: TokenizerParams) -> tuple[Any, dict[str, int]]:
    """Train a ``tokenizers.Tokenizer`` with XLM-R's pipeline and special-token ids.

    Returns the tokenizer and alphabet statistics (characters seen / kept by the coverage rule).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    texts = [normalizer.normalize_str(t) for t in texts]
    kept, seen = covered_characters(texts, params.character_coverage)
    alphabet = {"characters_seen": seen, "characters_kept": len(kept)}
    if params.character_coverage < 1.0:
        texts = drop_rare_characters(texts, kept)
    n_model = params.vocab_size - 1  # <mask> is added after training, as the last id
    trainer: trainers.UnigramTrainer | trainers.BpeTrainer
    if params.model == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=n_model,
            special_tokens=list(SPECIAL_TOKENS),
            unk_token="<unk>",
            max_piece_length=params.max_piece_length,
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(
            vocab_size=n_model,
            special_tokens=list(SPECIAL_TOKENS),
            min_frequency=params.min_frequency,
            show_progress=False,
        )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_special_tokens([AddedToken(MASK_TOKEN, lstrip=True, special=True, normalized=False)])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise ValueError(f"trained vocabulary puts {t!r} at id {tok.token_to_id(t)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tok, alphabet


def wrap_fast(tok: Any, model_max_length: int) -> Any:
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with XLM-R's special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token=MASK_TOKEN,
        model_max_length=model_max_length,
    )


def _load_pretrained(name: str) -> Any:
    """Load a tokenizer from a local directory or the hub (respecting HF_HUB_OFFLINE)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"pretrained: cannot load tokenizer {name!r} ({e}); give a local directory or a hub name "
            "available in the local cache (HF_HUB_OFFLINE=1 forbids downloads)"
        ) from e


def tokenizer_summary(tokenizer: Any) -> dict[str, Any]:
    """JSON-serialisable facts about a saved tokenizer for the artifact metadata."""
    names = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")
    ids = {f"{n}_token_id": getattr(tokenizer, f"{n}_token_id", None) for n in names}
    return {"vocab_size": len(tokenizer), "class": type(tokenizer).__name__, **ids}


def evaluate_on_test(tokenizer: Any, corpus_dir: Path, max_chars: int = EVAL_CHARS) -> dict[str, dict[str, float]]:
    """Per language, the <unk> rate and characters per token on (the start of) the test split."""
    out: dict[str, dict[str, float]] = {}
    for lang in corpus_languages(corpus_dir):
        texts: list[str] = []
        used = 0
        for text in read_texts(corpus_dir, lang, "test"):
            texts.append(text)
            used += len(texts[-1])
            if used >= max_chars:
                break
        if not texts:
            continue
        ids = [i for row in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] for i in row]
        n = max(1, len(ids))
        out[lang] = {
            "unk_rate": round(sum(i == tokenizer.unk_token_id for i in ids) / n, 6),
            "chars_per_token": round(used / n, 4),
        }
    return out


def prefetch_tokenizer(params: TokenizerParams) -> Iterator[str]:
    """The pretrained tokenizer this stage copies, if any (``prefetch`` hook)."""
    from stages.hub import fetch_tokenizer

    if params.pretrained is not None:
        yield fetch_tokenizer(params.pretrained, _load_pretrained)


@stage(
    "tokenizer",
    params=TokenizerParams,
    inputs={"corpus": Input(type="corpus", optional=True)},
    outputs={"tokenizer": "tokenizer"},
    version="1",
    prefetch=prefetch_tokenizer,
)
def tokenizer_stage(params: TokenizerParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Train an XLM-R-like tokenizer on the corpus (or copy a pretrained one)."""
    out = ctx.output_dir("tokenizer")
    corpus = optional_input(inputs, "corpus") if params.pretrained is not None else get_input(inputs, "corpus")
    meta: dict[str, Any] = {"pretrained": params.pretrained}
    if params.pretrained is not None:
        tokenizer = _load_pretrained(params.pretrained)
    elif corpus is None:
        raise ValueError("tokenizer: set pretrained, or connect a 'corpus' input to train on")
    else:
        languages = corpus_languages(corpus.path)
        texts, chars = _training_texts(corpus.path, languages, params.max_chars_per_language)
        tok, alphabet = build_tokenizer(texts, params)
        tokenizer = wrap_fast(tok, params.model_max_length)
        meta.update({"model": params.model, "train_chars": chars, "languages": languages, **alphabet})
        ctx.log({f"{lang}/train_chars": float(n) for lang, n in chars.items()})
    tokenizer.save_pretrained(str(out))
    meta.update(tokenizer_summary(tokenizer))
    if corpus is not None:
        meta["test_split"] = evaluate_on_test(tokenizer, corpus.path)
        ctx.log({f"{lang}/test_{k}": v for lang, m in meta["test_split"].items() for k, v in m.items()})
    ctx.log({"vocab_size": float(len(tokenizer))})
    return {"tokenizer": meta}


TOKENIZER: StageDef = tokenizer_stage
