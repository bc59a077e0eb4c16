"""Stage ``encode``: shapes, masked mean pooling with padding, length-sorted batching, the four variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stagekit import FakeContext, make_input, run_stage  # noqa: E402

from stages.encode import ENCODE  # noqa: E402
from stages.formats.parallel import read_parallel, write_parallel  # noqa: E402
from stages.sentence_encoder import (  # noqa: E402
    effective_max_length,
    encode_sentences,
    in_order_batches,
    length_sorted_batches,
    position_budget,
    template_token_ids,
    tokenize_sentences,
)

N_WORDS = 40
CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
          "initializer_range": 0.3, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
MAX_TOKENS = 24  # the model embeds 24 positions


def make_model(root: Path, seed: int = 0) -> Path:
    """A saved tiny XLM-R masked LM with a word-level tokenizer whose template is <s> A </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from stages.mlm import build_model

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(N_WORDS)),
                                         "<mask>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
    )
    root.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(root)
    torch.manual_seed(seed)
    model = build_model(CONFIG, root, block_size=MAX_TOKENS)
    model.save_pretrained(root)
    return root


def sentences(n: int, seed: int, lo: int = 1, hi: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{int(w)}" for w in rng.integers(0, N_WORDS, size=int(rng.integers(lo, hi))))
            for _ in range(n)]


def make_parallel(root: Path, langs: tuple[str, ...] = ("en", "de", "zh"), n: int = 11) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    texts = {lang: sentences(n, seed=i) for i, lang in enumerate(langs)}
    texts["en"][3] = " ".join(["w5"] * 40)  # longer than the model's positions: truncated
    write_parallel(root, langs, [{"id": f"s{i}", **{lang: texts[lang][i] for lang in langs}} for i in range(n)])
    (root / "meta.json").write_text(json.dumps({"languages": list(langs), "n": n, "source": "file"}))
    return root


def write_mask(root: Path, mask: np.ndarray, language: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "mask.npy", mask.astype(np.float32))
    (root / "mask.json").write_text(json.dumps({"language": language, "mask": mask.tolist()}))
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("encode")
    return {"model": make_model(root / "model"), "parallel": make_parallel(root / "parallel"), "root": root}


def run_encode(study: dict, tmp: Path, mask: Path | None = None, seed: int = 0, **params) -> tuple[dict, Path, FakeContext]:
    ctx = FakeContext(tmp, seed=seed)
    inputs = {"model": make_input(study["model"], "model"), "parallel": make_input(study["parallel"], "parallel-corpus")}
    if mask is not None:
        inputs["mask"] = make_input(mask, "head-mask")
    meta = run_stage(ENCODE, {"batch_size": 4, **params}, ctx, inputs)["encodings"]
    return dict(meta), ctx.output_dir("encodings"), ctx


def load(out: Path, lang: str) -> np.ndarray:
    return np.load(out / f"{lang}.npy")


@pytest.fixture(scope="module")
def full(study: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, FakeContext]:
    return run_encode(study, tmp_path_factory.mktemp("full"))


# --------------------------------------------------------------------------------------------------


def test_length_sorted_batches():
    assert length_sorted_batches([3, 7, 1, 7, 5], 2) == [[1, 3], [4, 0], [2]]
    assert length_sorted_batches([], 4) == []
    batches = length_sorted_batches(list(range(10)), 3)
    assert sorted(i for b in batches for i in b) == list(range(10))


def test_position_budget_splits_the_long_tail():
    lengths = [40, 12, 11, 10, 10, 9, 9, 9]
    budget = position_budget(lengths, 4)
    assert budget == 4 * 14  # 4 sentences of the mean length, 13.75 rounded up
    # the 40-token sentence is alone (never dropped, though over the budget); the rest fill by count
    assert length_sorted_batches(lengths, 4, budget) == [[0], [1, 2, 3, 4], [5, 6, 7]]
    assert length_sorted_batches(lengths, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert in_order_batches(5, 2) == [[0, 1], [2, 3], [4]] and in_order_batches(0, 2) == []


def test_encodings_layout_and_meta(full):
    meta, out, ctx = full
    assert sorted(p.name for p in out.iterdir()) == [
        "de.lengths.npy", "de.npy", "en.lengths.npy", "en.npy", "meta.json", "zh.lengths.npy", "zh.npy"]
    for lang in ("en", "de", "zh"):
        arr = load(out, lang)
        assert arr.shape == (3, 11, 32) and arr.dtype == np.float32 and np.isfinite(arr).all()
    on_disk = json.loads((out / "meta.json").read_text())
    assert {k: on_disk[k] for k in ("variant", "language", "languages", "n", "layers", "hidden")} == {
        "variant": "full", "language": None, "languages": ["en", "de", "zh"], "n": 11, "layers": [0, 1, 2],
        "hidden": 32}
    assert "padding_fraction" in on_disk and 0 < on_disk["padding_fraction"] < 1
    assert "<s>" in on_disk["pooling"] and "padding excluded" in on_disk["pooling"]
    assert on_disk["max_length"] == MAX_TOKENS  # None: the model's 24 positions
    assert on_disk["at_max_length"] == 1  # the 40-word English sentence
    assert on_disk["truncated"] == {"en": 1, "de": 0, "zh": 0} and on_disk["truncated_total"] == 1
    logged = ctx.logged()
    assert logged["en/sentences_per_s"] > 0 and 0 < logged["padding_fraction"] < 1


def test_pooling_matches_manual_mean_and_ignores_padding(study):
    from stages.mlm import load_model, load_tokenizer

    model, tok = load_model(study["model"]).eval(), load_tokenizer(study["model"])
    short, long_ = "w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10 w11 w12"
    alone, _ = encode_sentences(model, tok, [short], batch_size=1)
    # 11 + 3 x 5 tokens: a budget of 4 x 7 positions puts the long one with one short one (6 pads)
    together, stats = encode_sentences(model, tok, [long_, short, short, short], batch_size=4)
    assert stats["padded_positions"] == 6 and stats["padding_fraction"] == pytest.approx(6 / 32)
    np.testing.assert_allclose(together[:, 1], alone[:, 0], atol=1e-5)
    # manual: hidden states of <s> w1 w2 w3 </s>, mean over the 3 word positions (template tokens excluded)
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        hs = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    manual = np.stack([h[0, 1:4].mean(0).numpy() for h in hs])
    np.testing.assert_allclose(alone[:, 0], manual, atol=1e-5)
    with_special, _ = encode_sentences(model, tok, [short, long_], batch_size=2, include_special_tokens=True)
    np.testing.assert_allclose(with_special[:, 0], np.stack([h[0].mean(0).numpy() for h in hs]), atol=1e-5)
    assert template_token_ids(tok) == [0, 2]


def test_sorted_batching_restores_order(study):
    from stages.mlm import load_model, load_tokenizer

    model, tok = load_model(study["model"]).eval(), load_tokenizer(study["model"])
    texts = sentences(9, seed=5)
    one_by_one, s1 = encode_sentences(model, tok, texts, batch_size=1)
    batched, s4 = encode_sentences(model, tok, texts, batch_size=4)
    assert s1["padded_positions"] == 0 and s4["padded_positions"] > 0
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    perm = [8, 2, 5, 0, 1, 7, 3, 6, 4]
    shuffled, _ = encode_sentences(model, tok, [texts[i] for i in perm], batch_size=4)
    np.testing.assert_allclose(shuffled, one_by_one[:, perm], atol=1e-5)
    assert not np.allclose(one_by_one[:, 0], one_by_one[:, 1])  # different sentences differ


def test_random_variant_differs_from_full_and_is_seeded(study, full, tmp_path):
    _, full_out, _ = full
    meta, out, _ = run_encode(study, tmp_path / "r1", variant="random", seed=3)
    _, out2, _ = run_encode(study, tmp_path / "r2", variant="random", seed=3)
    _, out3, _ = run_encode(study, tmp_path / "r3", variant="random", seed=4)
    assert meta["variant"] == "random" and meta["language"] is None
    r, f = load(out, "de"), load(full_out, "de")
    assert r.shape == f.shape and not np.allclose(r[1:], f[1:], atol=1e-3)
    np.testing.assert_array_equal(r, load(out2, "de"))
    assert not np.allclose(r, load(out3, "de"))


def test_subnetwork_with_all_ones_mask_equals_full(study, full, tmp_path):
    _, full_out, _ = full
    ones = write_mask(tmp_path / "ones", np.ones((2, 4)), "de")
    meta, out, _ = run_encode(study, tmp_path / "s1", mask=ones, variant="subnetwork")
    assert meta["variant"] == "subnetwork" and meta["language"] == "de" and meta["heads_kept"] == 8
    for lang in ("en", "de", "zh"):
        np.testing.assert_allclose(load(out, lang), load(full_out, lang), atol=1e-6)
    mask = np.ones((2, 4))
    mask[1, 2] = mask[0, 0] = 0
    some = write_mask(tmp_path / "some", mask, "zh")
    meta2, out2, _ = run_encode(study, tmp_path / "s2", mask=some, variant="subnetwork", language="zh")
    assert meta2["language"] == "zh" and meta2["heads_kept"] == 6
    sub, f = load(out2, "en"), load(full_out, "en")
    np.testing.assert_allclose(sub[0], f[0], atol=1e-6)  # embeddings untouched
    assert not np.allclose(sub[1], f[1], atol=1e-4)  # the gated layer changes
    # the gated model equals a model whose masked heads' projection columns are zeroed
    from stages.gating import apply_mask_
    from stages.mlm import load_model, load_tokenizer

    zeroed = load_model(study["model"]).eval()
    apply_mask_(zeroed, mask)
    texts = [r["en"] for r in read_parallel(study["parallel"])[1]]
    ref, _ = encode_sentences(zeroed, load_tokenizer(study["model"]), texts, max_length=MAX_TOKENS)
    np.testing.assert_allclose(sub, ref, atol=1e-5)


def test_subnetwork_errors(study, tmp_path):
    mask = write_mask(tmp_path / "m", np.ones((2, 4)), "de")
    with pytest.raises(ValueError, match="needs a 'mask' input"):
        run_encode(study, tmp_path / "a", variant="subnetwork", language="de")
    with pytest.raises(ValueError, match="mask of 'de'"):
        run_encode(study, tmp_path / "b", mask=mask, variant="subnetwork", language="zh")
    with pytest.raises(ValueError, match="takes no 'mask' input"):
        run_encode(study, tmp_path / "c", mask=mask, variant="full")


def test_base_variant_and_float16(study, full, tmp_path):
    _, full_out, _ = full
    meta, out, _ = run_encode(study, tmp_path / "b", variant="base", base_model=str(study["model"]), dtype="float16")
    assert meta["variant"] == "base" and meta["dtype"] == "float16"
    arr = load(out, "zh")
    assert arr.dtype == np.float16
    np.testing.assert_allclose(arr.astype(np.float32), load(full_out, "zh"), rtol=2e-3, atol=2e-3)
    meta2, out2, _ = run_encode(study, tmp_path / "b2", variant="base")  # the input model, labelled base
    assert meta2["variant"] == "base"
    np.testing.assert_array_equal(load(out2, "en"), load(full_out, "en"))
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="base_model"):
        ENCODE.params.model_validate({"variant": "full", "base_model": "x"})


def test_max_length_defaults_to_the_models_position_limit(study):
    from stages.mlm import load_model, load_tokenizer

    assert ENCODE.params.model_validate({}).max_length is None
    model, tok = load_model(study["model"]), load_tokenizer(study["model"])
    assert effective_max_length(model, tok, None) == MAX_TOKENS  # 26 positions minus the pad offset 2
    assert effective_max_length(model, tok, 10) == 10 and effective_max_length(model, tok, 500) == MAX_TOKENS
    tok.model_max_length = 16  # the tokenizer's limit counts too
    assert effective_max_length(model, tok, None) == 16
    one = " ".join(["w1"] * 30)
    _, stats = encode_sentences(model, load_tokenizer(study["model"]), [one, "w2 w3"])  # no max_length given
    assert stats["max_length"] == MAX_TOKENS and stats["truncated"] == 1


def test_tokenize_sentences_counts_only_sentences_that_were_cut(study):
    from stages.mlm import load_tokenizer

    tok = load_tokenizer(study["model"])
    words = lambda k: " ".join(f"w{i % N_WORDS}" for i in range(k))  # noqa: E731
    texts = [words(6), words(7), words(3), words(30)]  # 8, 9, 5 and 32 tokens with <s> and </s>
    t = tokenize_sentences(tok, texts, max_length=8)
    assert t.untruncated == [8, 9, 5, 32]
    assert t.lengths == [8, 8, 5, 8] and t.truncated == 2  # exactly 8 tokens fits: not cut
    assert all(ids[0] == 0 and ids[-1] == 2 for ids in t.ids)  # <s> ... </s> kept on cut sentences
    assert t.ids[1] == tok(texts[1], truncation=True, max_length=8)["input_ids"]
    assert t.ids[0] == tok(texts[0])["input_ids"]


def test_lengths_files_and_truncated_counts_per_language(study, tmp_path):
    meta, out, _ = run_encode(study, tmp_path / "short", max_length=8)
    rows = read_parallel(study["parallel"])[1]
    assert meta["max_length"] == 8
    for lang in ("en", "de", "zh"):
        true = np.array([len(r[lang].split()) + 2 for r in rows])
        lengths = np.load(out / f"{lang}.lengths.npy")
        assert lengths.dtype == np.int32 and lengths.shape == (11,)
        np.testing.assert_array_equal(lengths, np.minimum(true, 8))  # corpus order, specials counted
        assert meta["truncated"][lang] == int((true > 8).sum())
    assert meta["truncated_total"] == sum(meta["truncated"].values()) > 1
