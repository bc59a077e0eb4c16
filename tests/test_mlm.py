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
    """A dataset artifact as stage ``tokenize`` writes it: <lang>/{train,test}.npy and meta.json."""
    rng = np.random.default_rng(seed)
    counts = {}
    for i, lang in enumerate(langs):
        (out / lang).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            chunks = _language_stream(i, n * block, rng).reshape(n, block)
            np.save(out / lang / f"{split}.npy", chunks)
            counts.setdefault(lang, {})[split] = {"chunks": n}
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
    arr = mlm.load_split(tiny["ds_dir"], "bb", "test")
    assert arr.shape == (6, BLOCK) and arr.dtype == np.int32
    assert isinstance(mlm.load_split(tiny["ds_dir"], "bb", "train", mmap=True), np.memmap)
    with pytest.raises(ValueError, match="no zz/test.npy"):
        mlm.load_split(tiny["ds_dir"], "zz", "test")


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
    chunks = mlm.load_split(tiny["ds_dir"], "aa", "test")
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


def test_evaluate_can_be_stopped(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"])
    batches = mlm.language_eval_batches(tiny["ds_dir"], "aa", tiny["tokenizer"], batch_size=2)
    with pytest.raises(mlm.EvalStopped):
        mlm.evaluate(model, batches, should_stop=lambda: True)
