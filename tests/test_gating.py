"""stages.gating: head gates through pre-hooks on the attention output projection, subnetworks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_mlm import make_dataset, make_tokenizer, tiny_model  # noqa: E402

from stages import gating, mlm  # noqa: E402
from stages.formats import masks as head_mask_artifact  # noqa: E402
from stages.gating import MASK_JSON, MASK_NPY  # noqa: E402

# larger initial weights than XLM-R's 0.02 so that one head visibly moves the logits of a random model
INIT = {"initializer_range": 0.2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gating")
    tok_dir = make_tokenizer(root / "tokenizer")
    ds_dir = make_dataset(root / "dataset", langs=("aa",), n_train=2, n_test=6)
    tok = mlm.load_tokenizer(tok_dir)
    return {"tok_dir": tok_dir, "batches": mlm.language_eval_batches(ds_dir, "aa", tok, batch_size=3)}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_finds_one_projection_per_layer(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"], **INIT)
    projs = gating.attention_output_projections(model)
    assert projs == [layer.attention.output.dense for layer in model.roberta.encoder.layer]
    assert gating.gate_shape(model) == (2, 4)


def test_ones_change_nothing_and_a_zero_gate_changes_the_logits(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"], **INIT)
    batch = tiny["batches"][0]
    ref = _logits(model, batch)
    with gating.HeadGates(model) as g:
        assert g.gates.shape == (2, 4) and bool((g.gates == 1).all())
        assert torch.equal(_logits(model, batch), ref)
        mask = np.ones((2, 4), np.float32)
        mask[1, 2] = 0.0
        g.set(mask)
        gated = _logits(model, batch)
        assert (gated - ref).abs().max() > 1e-2
        g.set(np.ones((2, 4)))
        assert torch.equal(_logits(model, batch), ref)
        g.set(mask)
    assert not g.attached
    assert torch.equal(_logits(model, batch), ref)  # hooks removed on exit


def test_head_mask_argument_is_silently_ignored_by_transformers(tiny: dict) -> None:
    """Why gating uses hooks: if this starts failing, transformers honours head_mask again."""
    model = tiny_model(tiny["tok_dir"], **INIT)
    batch = tiny["batches"][0]
    with torch.no_grad():
        ignored = model(input_ids=batch["input_ids"], head_mask=torch.zeros(2, 4)).logits
        plain = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(ignored, plain)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gate_slices_the_right_head(tiny: dict, attn: str) -> None:
    """Gating head h of layer l equals zeroing head h's value projection (an independent route)."""
    model = tiny_model(tiny["tok_dir"], **INIT)
    model.set_attn_implementation(attn)
    batch = tiny["batches"][1]
    mask = np.ones((2, 4), np.float32)
    mask[0, 1] = 0.0
    mask[1, 3] = 0.0
    with gating.HeadGates(model, mask):
        gated = _logits(model, batch)
    ref = tiny_model(tiny["tok_dir"], **INIT)
    d = 32 // 4
    with torch.no_grad():
        for layer, head in ((0, 1), (1, 3)):
            value = ref.roberta.encoder.layer[layer].attention.self.value
            value.weight[head * d:(head + 1) * d] = 0
            value.bias[head * d:(head + 1) * d] = 0
    assert torch.allclose(gated, _logits(ref, batch), atol=1e-5)


def test_gate_gradients_are_nonzero(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"], **INIT)
    gates = gating.gate_heads(model, requires_grad=True)
    try:
        loss, n = mlm.mlm_loss(model, tiny["batches"][0])
        assert n > 0
        loss.backward()
        grad = gates.gates.grad
        assert grad is not None and grad.shape == (2, 4)
        assert bool((grad.abs() > 0).all()), grad
        # the same gradient through the stock forward (the prune stage uses model(**batch).loss)
        gates.gates.grad = None
        model(**tiny["batches"][0]).loss.backward()
        assert torch.allclose(gates.gates.grad, grad, atol=1e-6)
    finally:
        gates.remove()


def test_saved_subnetwork_reloads_and_matches_the_gated_model(tiny: dict, tmp_path: Path) -> None:
    model = tiny_model(tiny["tok_dir"], **INIT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = np.ones((2, 4), np.float32)
    mask[0, 0] = mask[0, 3] = mask[1, 1] = 0.0
    with gating.HeadGates(model, mask):
        gated = [_logits(model, b) for b in tiny["batches"]]
        gating.save_subnetwork(model, mask, tmp_path / "sub", tokenizer=mlm.load_tokenizer(tiny["tok_dir"]))
    for k, v in model.state_dict().items():  # the model itself is unchanged
        assert torch.equal(v, before[k]), k
    sub = mlm.load_model(tmp_path / "sub").eval()
    assert sub.config.num_attention_heads == 4  # shapes unchanged
    for b, g in zip(tiny["batches"], gated, strict=True):
        assert torch.allclose(_logits(sub, b), g, atol=1e-5)
        assert (_logits(model, b) - g).abs().max() > 1e-3  # differs from the full model
    dense = sub.roberta.encoder.layer[0].attention.output.dense.weight
    assert bool((dense[:, 0:8] == 0).all()) and bool((dense[:, 8:16] != 0).any())
    np.testing.assert_array_equal(load_head_mask(tmp_path / "sub"), mask)
    info = (tmp_path / "sub" / gating.MASK_JSON).read_text()
    assert '"heads_kept": 5' in info
    assert (tmp_path / "sub" / "tokenizer.json").is_file()


def test_apply_mask_in_place_equals_gates(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"], **INIT)
    mask = np.zeros((2, 4), np.float32)
    mask[0, 2] = 1.0
    with gating.HeadGates(model, mask):
        gated = _logits(model, tiny["batches"][0])
    gating.apply_mask_(model, mask)
    assert torch.allclose(_logits(model, tiny["batches"][0]), gated, atol=1e-5)


def test_bad_mask_shapes_are_rejected(tiny: dict) -> None:
    model = tiny_model(tiny["tok_dir"], **INIT)
    with pytest.raises(ValueError, match="shape"):
        gating.HeadGates(model, np.ones((4, 2)))
    with pytest.raises(ValueError, match="0/1"):
        gating.save_subnetwork(model, np.full((2, 4), 0.5), Path("/nonexistent-never-written"))


# (a helper only these tests use, moved here from the package)
def load_head_mask(path: Path | str) -> np.ndarray:
    """A head mask from a directory (a saved subnetwork's ``head_mask.npy``, a ``head-mask`` artifact's
    ``mask.npy`` (:mod:`stages.formats.masks`), or their ``.json``) or a file."""

    p = Path(path)
    candidates: Sequence[Path] = (
        [p] if p.is_file() else [p / MASK_NPY, p / head_mask_artifact.MASK_NPY, p / MASK_JSON, p / head_mask_artifact.MASK_JSON]
    )
    for c in candidates:
        if c.is_file():
            if c.suffix == ".npy":
                return np.asarray(np.load(c), dtype=np.float32)
            return np.asarray(json.loads(c.read_text(encoding="utf-8"))["mask"], dtype=np.float32)
    raise ValueError(f"no head mask found at {p}")
