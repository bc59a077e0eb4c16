"""stages.mlm: dataset access, tiny models, deterministic evaluation masking, the MLM loss.

Also holds the tiny fixtures (tokenizer, dataset, model) that test_gating and test_train import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stages import mlm  # noqa: E402

N_WORDS = 60
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
BLOCK = 32


def make_tokenizer(out: Path) -> Path:
    """A word-level XLM-R-like tokenizer (<s>=0 <pad>=1 </s>=2 <unk>=3, words, <mask> last), saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *(f"w{i}" for i in range(N_WORDS)), "<mask>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=BLOCK,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def _language_stream(lang_index: int, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable synthetic 'language': documents <s> w_a w_{a+k} w_{a+2k} ... </s> in its own word range."""
    lo = 4 + lang_index * 15
    stride = lang_index + 1
    out: list[int] = []
    while len(out) < n_tokens:
        start = int(rng.integers(0, 15))
        length = int(rng.integers(6, 14))
        out += [0] + [lo + (start + stride * j) % 15 for j in range(length)] + [2]
    return np.asarray(out[:n_tokens], dtype=np.int32)


def make_dataset(out: Path, langs: tuple[str, ...] = ("aa", "bb", "cc"), n_train: int = 24, n_test: int = 6,
                 block: int = BLOCK, seed: int = 0) -> Path:
    """A dataset artifact written as stage ``tokenize`` writes it (``write_language``: <lang>/ with splits
    train, select, report) and meta.json; each test half has ``n_test`` chunks, drawn independently (so the
    halves differ)."""
    from stages.formats.dataset import write_language

    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for i, lang in enumerate(langs):
        splits = {}
        for split, n in (("train", n_train), ("select", n_test), ("report", n_test)):
            splits[split] = _language_stream(i, n * block, rng).reshape(n, block)
            counts.setdefault(lang, {})[split] = {"chunks": n}
        write_language(out, lang, splits)
    meta = {"block_size": block, "vocab_size": N_WORDS + 5, "pad_token_id": 1, "mask_token_id": N_WORDS + 4,
            "bos_token_id": 0, "eos_token_id": 2, "unk_token_id": 3, "languages": list(langs), "counts": counts}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def tiny_model(tokenizer_dir: Path, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = mlm.build_model({**TINY_CONFIG, **overrides}, tokenizer_dir, BLOCK)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    tok_dir = make_tokenizer(root / "tokenizer")
    ds_dir = make_dataset(root / "dataset")
    return {"tok_dir": tok_dir, "ds_dir": ds_dir, "tokenizer": mlm.load_tokenizer(tok_dir)}


# --------------------------------------------------------------------------------------------------


def test_dataset_access(tiny: dict) -> None:
    assert mlm.dataset_languages(tiny["ds_dir"]) == ["aa", "bb", "cc"]
    arr = mlm.load_split(tiny["ds_dir"], "bb", "select")
    assert arr.shape == (6, BLOCK) and arr.dtype == np.int32
    assert not np.array_equal(arr, mlm.load_split(tiny["ds_dir"], "bb", "report"))
    with pytest.raises(ValueError, match="no zz/select"):
        mlm.load_split(tiny["ds_dir"], "zz", "select")
    with pytest.raises(ValueError, match="'train', 'select' or 'report'"):
        mlm.load_split(tiny["ds_dir"], "bb", "test")


def test_a_dataset_of_npy_files_asks_to_rerun_tokenize(tmp_path: Path) -> None:
    """A dataset of the tokenize stage before version 3 (.npy files; version 1: one test.npy, no halves) is
    refused with what to do."""
    for old in ("select.npy", "test.npy"):
        (tmp_path / old / "xx").mkdir(parents=True)
        np.save(tmp_path / old / "xx" / "train.npy", np.zeros((2, BLOCK), np.int32))
        np.save(tmp_path / old / "xx" / old, np.zeros((2, BLOCK), np.int32))
        for split in ("train", "select", "report"):
            with pytest.raises(ValueError, match=r"xx/\*.npy files of a tokenize stage before version 3.*re-run the tokenize"):
                mlm.load_split(tmp_path / old, "xx", split)


def test_eval_params_split_defaults_to_the_selection_half() -> None:
    from pydantic import ValidationError

    p = mlm.EvalParams.model_validate({})
    assert p.split == "select" and p.bootstrap_resamples == 1000 and p.interval_level == 0.95
    assert mlm.EvalParams.model_validate({"split": "report"}).split == "report"
    with pytest.raises(ValidationError):
        mlm.EvalParams.model_validate({"split": "test"})


def test_dataset_languages_without_meta(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", langs=("xx", "de"), n_train=2, n_test=2)
    (ds / "meta.json").unlink()
    assert mlm.dataset_languages(ds) == ["de", "xx"]


def test_build_model_takes_vocab_and_ids_from_tokenizer(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"])
    tok = tiny["tokenizer"]
    assert type(model).__name__ == "XLMRobertaForMaskedLM"
    assert model.config.vocab_size == len(tok) == N_WORDS + 5
    assert model.config.pad_token_id == tok.pad_token_id == 1
    assert model.config.max_position_embeddings == BLOCK + 2  # positions start after the pad id
    assert model.config.num_hidden_layers == 2 and model.config.num_attention_heads == 4
    mlm.check_model_fits(model, BLOCK, N_WORDS + 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mlm.check_model_fits(model, BLOCK + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        mlm.check_model_fits(model, BLOCK, N_WORDS + 5)


def test_masking_scheme_statistics() -> None:
    rng = np.random.default_rng(1)
    chunks = rng.integers(4, 60, size=(400, 64)).astype(np.int32)
    chunks[:, 0], chunks[:, -1] = 0, 2  # special tokens: never masked
    inputs, labels = mlm.mask_chunks(chunks, 64, [0, 1, 2, 3, 64], 65, seed=7, language="en")
    masked = labels != -100
    assert not masked[:, 0].any() and not masked[:, -1].any()
    rate = masked[:, 1:-1].mean()
    assert 0.13 < rate < 0.17
    np.testing.assert_array_equal(labels[masked], chunks[masked])
    np.testing.assert_array_equal(inputs[~masked], chunks[~masked])  # unmasked positions untouched
    as_mask = (inputs[masked] == 64).mean()
    unchanged = (inputs[masked] == chunks[masked]).mean()
    assert 0.76 < as_mask < 0.84
    assert 0.07 < unchanged < 0.14  # 10% kept + the random replacements that drew the same id


def test_masks_depend_on_seed_language_and_chunk_only(tiny: dict) -> None:
    chunks = mlm.load_split(tiny["ds_dir"], "aa", "select")
    tok = tiny["tokenizer"]
    args = (tok.mask_token_id, mlm.special_token_ids(tok), len(tok))
    a = mlm.eval_batches(chunks, *args, batch_size=4, seed=3, language="aa")
    b = mlm.eval_batches(chunks, *args, batch_size=4, seed=3, language="aa")
    for x, y in zip(a, b, strict=True):
        for k in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(x[k], y[k])
    # batch size and the number of chunks do not move the masks of a chunk
    c = mlm.eval_batches(chunks, *args, batch_size=5, seed=3, language="aa")
    assert torch.equal(torch.cat([x["labels"] for x in a]), torch.cat([x["labels"] for x in c]))
    d = mlm.eval_batches(chunks[:3], *args, batch_size=2, seed=3, language="aa")
    assert torch.equal(torch.cat([x["input_ids"] for x in d]), torch.cat([x["input_ids"] for x in a])[:3])
    # another seed or another language gives other masks
    e = mlm.eval_batches(chunks, *args, batch_size=4, seed=4, language="aa")
    f = mlm.eval_batches(chunks, *args, batch_size=4, seed=3, language="bb")
    ref = torch.cat([x["labels"] for x in a])
    assert not torch.equal(ref, torch.cat([x["labels"] for x in e]))
    assert not torch.equal(ref, torch.cat([x["labels"] for x in f]))
    assert set(a[0]) == {"input_ids", "attention_mask", "labels"}
    assert a[0]["input_ids"].dtype == torch.long and a[0]["input_ids"].shape == (4, BLOCK)


def test_attention_mask_excludes_padding() -> None:
    chunks = np.array([[0, 5, 6, 7, 2, 1, 1, 1]], dtype=np.int32)
    (batch,) = mlm.eval_batches(chunks, 64, [0, 1, 2, 3, 64], 65, 8, seed=0, mlm_probability=0.9, pad_token_id=1)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert (batch["labels"][0, 5:] == -100).all()


def test_mlm_loss_matches_the_model_loss(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"])
    batches = mlm.language_eval_batches(tiny["ds_dir"], "cc", tiny["tokenizer"], batch_size=3)
    with torch.no_grad():
        for batch in batches:
            ours, n = mlm.mlm_loss(model, batch)
            ref = model(**batch).loss
            assert n == int((batch["labels"] != -100).sum()) > 0
            assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)


def test_evaluate_is_token_weighted_and_deterministic(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"])
    model.train()  # evaluate must switch dropout off and restore the mode
    tok = tiny["tokenizer"]
    batches = mlm.language_eval_batches(tiny["ds_dir"], "aa", tok, batch_size=4)
    first = mlm.evaluate(model, batches)
    assert model.training
    again = mlm.evaluate(model, batches)
    fresh = mlm.evaluate(model, mlm.language_eval_batches(tiny["ds_dir"], "aa", tok, batch_size=5))
    assert first == again
    assert fresh["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
    assert fresh["tokens"] == first["tokens"]
    # reference: sum of per-token cross-entropy over all masked positions / their count
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            sel = b["labels"] != -100
            total += float(torch.nn.functional.cross_entropy(logits[sel], b["labels"][sel], reduction="sum"))
            count += int(sel.sum())
    assert first["tokens"] == count
    assert first["loss"] == pytest.approx(total / count, rel=1e-5)
    assert first["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # a random model over 65 words is close to uniform
    assert 30 < first["perplexity"] < 150


def test_language_eval_batches_read_the_half_asked_for(tiny: dict) -> None:
    tok = tiny["tokenizer"]
    default = mlm.language_eval_batches(tiny["ds_dir"], "aa", tok, batch_size=6)
    select = mlm.language_eval_batches(tiny["ds_dir"], "aa", tok, batch_size=6, split="select")
    report = mlm.language_eval_batches(tiny["ds_dir"], "aa", tok, batch_size=6, split="report")
    assert torch.equal(default[0]["input_ids"], select[0]["input_ids"])  # default: the selection half
    raw = mlm.load_split(tiny["ds_dir"], "aa", "report")
    unmasked = report[0]["labels"] == -100
    assert torch.equal(report[0]["input_ids"][unmasked], torch.from_numpy(raw.astype(np.int64))[unmasked])
    assert not torch.equal(select[0]["input_ids"], report[0]["input_ids"])


def test_evaluate_chunks_gives_per_chunk_sums_whatever_the_batch_size(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"])
    tok = tiny["tokenizer"]
    by4 = mlm.evaluate_chunks(model, mlm.language_eval_batches(tiny["ds_dir"], "bb", tok, batch_size=4))
    by1 = mlm.evaluate_chunks(model, mlm.language_eval_batches(tiny["ds_dir"], "bb", tok, batch_size=1))
    assert by4.loss_sum.shape == by4.tokens.shape == (6,)
    np.testing.assert_allclose(by4.loss_sum, by1.loss_sum, rtol=1e-5)
    np.testing.assert_array_equal(by4.tokens, by1.tokens)
    # one batch per chunk: the chunk's sum is that batch's summed loss
    for i, batch in enumerate(mlm.language_eval_batches(tiny["ds_dir"], "bb", tok, batch_size=1)):
        with torch.no_grad():
            loss, n = mlm.mlm_loss(model, batch, reduction="sum")
        assert by1.tokens[i] == n and by1.loss_sum[i] == pytest.approx(float(loss), rel=1e-5)
    summary = by4.summary()
    assert summary == mlm.evaluate(model, mlm.language_eval_batches(tiny["ds_dir"], "bb", tok, batch_size=4))
    assert summary["loss"] == pytest.approx(by4.loss_sum.sum() / by4.tokens.sum())
    assert summary["tokens"] == float(by4.tokens.sum())


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 15, size=40)
    loss_sum = tokens * rng.uniform(1.5, 2.5, size=40)
    point = math.exp(loss_sum.sum() / tokens.sum())
    lo, hi = mlm.bootstrap_perplexity_interval(loss_sum, tokens, seed=[1, 2])
    assert lo < point < hi
    assert (lo, hi) == mlm.bootstrap_perplexity_interval(loss_sum, tokens, seed=[1, 2])
    assert (lo, hi) != mlm.bootstrap_perplexity_interval(loss_sum, tokens, seed=[1, 3])
    lo50, hi50 = mlm.bootstrap_perplexity_interval(loss_sum, tokens, seed=[1, 2], level=0.5)
    assert lo < lo50 < point < hi50 < hi  # a lower level gives a narrower interval
    # four times the chunks: about half the width (the interval shrinks as 1/sqrt(n))
    big_tokens = np.tile(tokens, 4)
    wide = hi - lo
    blo, bhi = mlm.bootstrap_perplexity_interval(np.tile(loss_sum, 4), big_tokens, seed=[1, 2])
    assert 0.3 * wide < bhi - blo < 0.75 * wide
    # every chunk with the same mean loss: no spread at all
    flat = mlm.bootstrap_perplexity_interval(tokens * 2.0, tokens, seed=0)
    assert flat == pytest.approx((math.exp(2.0), math.exp(2.0)))
    with pytest.raises(ValueError, match="no masked tokens"):
        mlm.bootstrap_perplexity_interval(np.zeros(3), np.zeros(3), seed=0)


def test_evaluate_can_be_stopped(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"])
    batches = mlm.language_eval_batches(tiny["ds_dir"], "aa", tiny["tokenizer"], batch_size=2)
    with pytest.raises(mlm.EvalStopped):
        mlm.evaluate(model, batches, should_stop=lambda: True)
