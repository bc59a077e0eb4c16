"""cross_eval's full-model row taken from train's recorded numbers by lineage (stages.eval_reuse).

A real ``train`` run on a tiny model; its output and dataset are committed to a real LocalStore with the
producer record the runner writes (train's parameters and input versions), and ``ctx.provenance`` is the
engine's own ``upstream`` walk of that store. cross_eval then runs twice on the same inputs: reusing
train's numbers, and computing them (no provenance): the full rows must be equal exactly (same weights,
batches and masks in float32 on this CPU: no tolerance is needed, so none is allowed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate")

from stagekit import FakeContext, make_input, run_stage  # noqa: E402
from test_evaluate import write_mask  # noqa: E402
from test_prune import TINY_CONFIG, make_tiny_study  # noqa: E402

from orchestrator.artifacts import ArtifactRef, LocalStore, Producer  # noqa: E402
from orchestrator.provenance import upstream  # noqa: E402
from orchestrator.stage import ResolvedInput  # noqa: E402
from stages.eval_reuse import SETTINGS, recorded_full_model  # noqa: E402
from stages.evaluate import CROSS_EVAL  # noqa: E402
from stages.random_masks import random_mask_seeds, random_rows  # noqa: E402
from stages.train import TRAIN  # noqa: E402

LANGS = ("en", "de")
TRAIN_PARAMS = {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "eval_batch_size": 4, "max_eval_chunks": 6,
                "checkpoint_every": None, "mixed_precision": "auto", "eval_seed": 5}
EVAL_PARAMS = {"eval_batch_size": 4, "max_eval_chunks": 6, "eval_seed": 5, "random_mask_seeds": 2}


def _commit(store: LocalStore, name: str, type_: str, folder: Path, inputs: tuple[ArtifactRef, ...] = (),
            stage: str = "tokenize", params: dict[str, Any] | None = None,
            metadata: dict[str, Any] | None = None) -> ResolvedInput:
    """Log ``folder`` with a producer record as the runner writes it; the input a stage would get."""
    producer = Producer(job_key=f"k-{name}", study="t", stage=stage, job_label=stage, inputs=inputs,
                        provenance={"params": params or {}, "stage_version": "x", "seed": 0})
    v = store.log(name, type_, folder, producer=producer, metadata=metadata)
    return make_input(store.materialize(v.ref), type_, name=v.ref.name, version=v.ref.version, metadata=metadata)


@pytest.fixture(scope="module", params=["base", "config"])
def study(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """train (fine-tuning a saved model, or from a config) committed with its lineage."""
    root = tmp_path_factory.mktemp(f"reuse-{request.param}")
    model_dir, data_dir = make_tiny_study(root / "study", languages=LANGS, n_test=8)
    params = {**TRAIN_PARAMS, **({"config": TINY_CONFIG} if request.param == "config" else {})}
    inputs = {"dataset": make_input(data_dir, "dataset"), "tokenizer": make_input(model_dir, "tokenizer")}
    if request.param == "base":
        inputs["base"] = make_input(model_dir, "model")
    ctx = FakeContext(root / "train", seed=3)
    meta = run_stage(TRAIN, params, ctx, inputs)["model"]
    store = LocalStore(root / "store")
    dataset = _commit(store, "t.tokenize.dataset", "dataset", data_dir)
    tok = _commit(store, "t.tokenizer.tokenizer", "tokenizer", model_dir)
    dumped = TRAIN.params.model_validate(params).model_dump(mode="json")  # what the engine records
    refs = (ArtifactRef(dataset.name, dataset.version), ArtifactRef(tok.name, tok.version))
    model = _commit(store, "t.train.model", "model", ctx.root / "outputs" / "model", refs, "train", dumped, meta)
    prov = {"upstream": upstream(store, [ArtifactRef(model.name, model.version), refs[0]])}
    pruned = np.ones((2, 4), np.float32)
    pruned[0, :2] = 0
    masks = [make_input(write_mask(root / "m_en", pruned, "en"), "head-mask", point={"language": "en"}),
             make_input(write_mask(root / "m_de", np.ones((2, 4), np.float32), "de"), "head-mask")]
    return {"root": root, "model": model, "dataset": dataset, "masks": masks, "provenance": prov,
            "metrics": json.loads((model.path / "metrics.json").read_text()), "dumped": dumped}


def _cross_eval(study: dict[str, Any], name: str, provenance: dict[str, Any], **params: Any) -> tuple[dict, dict]:
    ctx = FakeContext(study["root"] / name, seed=21, provenance=provenance)
    inputs = {"model": study["model"], "dataset": study["dataset"], "masks": study["masks"]}
    meta = run_stage(CROSS_EVAL, {**EVAL_PARAMS, **params}, ctx, inputs)["metrics"]
    return json.loads((ctx.root / "outputs" / "metrics" / "cross_eval.json").read_text()), dict(meta)


@pytest.mark.parametrize("split", ["report", "select"])
def test_reused_full_row_equals_the_computed_one_exactly(study: dict[str, Any], split: str) -> None:
    reused, meta_r = _cross_eval(study, f"reused-{split}", study["provenance"], split=split)
    computed, meta_c = _cross_eval(study, f"computed-{split}", {}, split=split)
    assert reused["full_model_row"]["source"] == "train" == meta_r["full_model_row"]
    assert computed["full_model_row"]["source"] == "computed" == meta_c["full_model_row"]
    assert "no producer record" in computed["full_model_row"]["reason"]
    # the whole matrix, the full row included, is the same to the last bit; only where it came from differs
    for key in ("perplexity", "loss", "perplexity_interval", "relative_perplexity", "tokens", "random"):
        assert reused[key] == computed[key], key
    # what train recorded is what cross_eval computes
    numbers = study["metrics"]["after" if split == "report" else "select_after"]
    for j, lang in enumerate(LANGS):
        assert computed["perplexity"][-1][j] == numbers[lang]["perplexity"]
        assert computed["loss"][-1][j] == numbers[lang]["loss"]
        assert computed["perplexity_interval"][-1][j] == numbers[lang]["perplexity_interval"]
    # de's mask keeps every head: it is the full model, so its row and its random masks cost nothing either
    assert reused["perplexity"][1] == reused["perplexity"][-1]
    # forward passes: every distinct gated mask (en's, its random masks; de's and its random masks are all
    # ones) on every column, plus, when computed, the full model on every column
    seeds = random_mask_seeds(21, EVAL_PARAMS["random_mask_seeds"])
    gated = {np.load(study["masks"][0].path / "mask.npy").tobytes()}
    gated |= {m.tobytes() for _, m in random_rows([("en", np.load(study["masks"][0].path / "mask.npy"))], seeds)}
    assert meta_r["forward_cells"] == len(gated) * len(LANGS)
    assert meta_c["forward_cells"] == meta_r["forward_cells"] + len(LANGS)


def test_other_settings_are_computed_and_say_why(study: dict[str, Any]) -> None:
    doc, meta = _cross_eval(study, "chunks", study["provenance"], max_eval_chunks=5, random_mask_seeds=0)
    assert doc["full_model_row"]["source"] == "computed" == meta["full_model_row"]
    assert doc["full_model_row"]["reason"] == "train's max_eval_chunks is 6, this job's 5"
    assert doc["perplexity"][-1] != [study["metrics"]["after"][lang]["perplexity"] for lang in LANGS]


def _decide(study: dict[str, Any], *, model: ResolvedInput | None = None, dataset: ResolvedInput | None = None,
            provenance: dict[str, Any] | None = None, languages: tuple[str, ...] = LANGS, **wanted: Any) -> str | None:
    want = {k: study["dumped"][k] for k in SETTINGS} | wanted
    row = recorded_full_model(model or study["model"], dataset or study["dataset"], "report", languages, want,
                              study["provenance"] if provenance is None else provenance)
    return None if row.cells is not None else row.reason


def test_each_condition_of_reuse(study: dict[str, Any]) -> None:
    assert _decide(study) is None
    m, d = study["model"], study["dataset"]
    assert _decide(study, eval_seed=6) == "train's eval_seed is 5, this job's 6"
    assert _decide(study, eval_batch_size=8) == "train's eval_batch_size is 4, this job's 8"
    assert _decide(study, bootstrap_resamples=500) == "train's bootstrap_resamples is 1000, this job's 500"
    assert _decide(study, mlm_probability=0.2) == "train's mlm_probability is 0.15, this job's 0.2"
    other = make_input(d.path, "dataset", name=d.name, version=d.version + 1)
    assert "train read other data than t.tokenize.dataset:v1" in str(_decide(study, dataset=other))
    fp16 = make_input(m.path, "model", name=m.name, version=m.version, metadata={**m.metadata, "mixed_precision": "fp16"})
    assert _decide(study, model=fp16) == "train evaluated with mixed_precision='fp16', this job in float32"
    renamed = make_input(m.path, "model", name="t.other.model", metadata=m.metadata)
    assert _decide(study, model=renamed) == "no producer record of t.other.model:v0 upstream of this job"
    not_train = {"upstream": [{**e, "stage": "prune"} for e in study["provenance"]["upstream"]]}
    assert _decide(study, provenance=not_train) == f"{m.ref} was made by stage 'prune', not train"
    assert _decide(study, languages=("en", "xx")) == "metrics.json has no complete 'after' numbers of 'xx'"
