"""Stage ``similarity``: CKA (biased and debiased, feature space) against Gram-matrix references, RSA,
eigenvector similarity, and the stage's similarity.json on hand-made encodings artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from stagekit import FakeContext, make_input, run_stage

from stages.similarity import (
    SIMILARITY,
    cka_matrix,
    cka_pair,
    cka_stats,
    debiased_cka,
    eigenvector_similarity,
    energy_k,
    isomorphism,
    knn_adjacency,
    laplacian_spectrum,
    linear_cka,
    rankdata,
    rsa,
)

# --------------------------------------------------------------------------------------------------
# Straightforward Gram-matrix references
# --------------------------------------------------------------------------------------------------


def hsic_biased_gram(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(h @ k @ h @ l)) / (n - 1) ** 2


def hsic_unbiased_gram(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012) eq. 5, with the diagonals of the (uncentred) Gram matrices set to 0."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    value = np.trace(k @ l) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one @ k @ l @ one
    return float(value) / (n * (n - 3))


def cka_gram(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    hsic = hsic_unbiased_gram if debiased else hsic_biased_gram
    k, l = x @ x.T, y @ y.T  # noqa: E741  raw (uncentred) features: the estimators centre themselves
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def related(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two partly related representations with non-zero means."""
    r = rng(seed)
    x = r.normal(size=(n, d)) + 3.0
    y = np.tanh(x @ r.normal(size=(d, d + 3))) + 0.7 * r.normal(size=(n, d + 3)) - 5.0
    return x, y


def orthogonal(d: int, seed: int = 1) -> np.ndarray:
    q, _ = np.linalg.qr(rng(seed).normal(size=(d, d)))
    return q


# --------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(12, 5), (40, 7), (25, 60)])
def test_cka_matches_gram_reference(n, d):
    x, y = related(n, d, seed=n)
    assert linear_cka(x, y) == pytest.approx(cka_gram(x, y, debiased=False), abs=1e-8)
    assert debiased_cka(x, y) == pytest.approx(cka_gram(x, y, debiased=True), abs=1e-8)
    assert 0.05 < linear_cka(x, y) < 0.999 and linear_cka(x, y) != pytest.approx(debiased_cka(x, y), abs=1e-3)


def test_cka_of_identical_representations_is_one():
    x, _ = related(50, 9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert debiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_transform_isotropic_scaling_and_shift():
    x, y = related(60, 8, seed=2)
    base, base_u = linear_cka(x, y), debiased_cka(x, y)
    q = orthogonal(y.shape[1])
    for yt in (y @ q, 7.5 * y, 0.01 * y @ q + 4.0):
        assert linear_cka(x, yt) == pytest.approx(base, abs=1e-10)
        assert debiased_cka(x, yt) == pytest.approx(base_u, abs=1e-10)
    assert linear_cka(x @ orthogonal(8, 5) * 3, y) == pytest.approx(base, abs=1e-10)
    # not invariant to an anisotropic scaling
    assert linear_cka(x * np.arange(1, 9), y) != pytest.approx(base, abs=1e-4)


def test_cka_matrix_is_every_pair():
    x, y = related(30, 6, seed=4)
    z = np.tanh(x[:, :4]) * 2.0 + 1.0  # a third representation of another width
    biased, unbiased = cka_matrix([x, y, z])
    for (i, a), (j, b) in [((0, x), (1, y)), ((0, x), (2, z)), ((1, y), (2, z))]:
        assert biased[i, j] == biased[j, i] == pytest.approx(cka_gram(a, b, debiased=False), abs=1e-8)
        assert unbiased[i, j] == unbiased[j, i] == pytest.approx(cka_gram(a, b, debiased=True), abs=1e-8)
    np.testing.assert_allclose(np.diag(biased), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(unbiased), 1.0, atol=1e-12)
    assert np.isnan(cka_matrix([x, y], debiased=False)[1]).all()


def test_cka_matrix_reuses_the_callers_buffers():
    xs = [related(25, 5, seed=i)[0].astype(np.float32) for i in range(3)]
    buffers: list[np.ndarray] = []
    first = cka_matrix(xs, buffers=buffers)
    kept = [id(b) for b in buffers]
    assert len(buffers) == 3 and all(b.dtype == np.float64 and b.shape == (25, 5) for b in buffers)
    again = cka_matrix(xs[::-1], buffers=buffers)  # the next layer: same shapes, same memory
    assert [id(b) for b in buffers] == kept
    np.testing.assert_allclose(again[0], first[0][::-1, ::-1], atol=1e-12)
    np.testing.assert_allclose(cka_matrix(xs)[1], first[1], atol=1e-12)
    cka_matrix([x[:, :4] for x in xs], buffers=buffers)  # another shape: replaced, not misused
    assert all(b.shape == (25, 4) for b in buffers)


def test_cka_is_symmetric_and_stats_are_reusable():
    x, y = related(30, 6, seed=4)
    sx, sy = cka_stats(x.astype(np.float32)), cka_stats(y)
    assert sx.xc.dtype == np.float64
    assert cka_pair(sx, sy) == pytest.approx(cka_pair(sy, sx), abs=1e-12)
    assert cka_pair(sx, sy)[0] == pytest.approx(linear_cka(x, y), abs=1e-6)  # x went through float32
    np.testing.assert_allclose(sx.xc.mean(0), 0.0, atol=1e-12)
    assert sx.self_sq == pytest.approx(np.linalg.norm(sx.xc.T @ sx.xc) ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="same sentences"):
        cka_pair(sx, cka_stats(y[:20]))
    with pytest.raises(ValueError, match="at least 4 sentences"):
        cka_stats(x[:3])
    with pytest.raises(ValueError, match=r"\[n, d\] matrix"):
        cka_stats(x[0])
    assert math.isnan(linear_cka(x, np.ones((30, 4))))  # a constant representation has no CKA
    assert math.isnan(debiased_cka(x, np.ones((30, 4))))


def test_shuffled_rows_control():
    x = rng(3).normal(size=(500, 768))
    shuffled = x[rng(4).permutation(500)]
    assert abs(debiased_cka(x, shuffled)) < 0.05
    assert linear_cka(x, shuffled) > 0.5  # the biased estimator is far from 0 at n=500, d=768


def test_biased_cka_of_independent_random_features():
    # docs/methods.md section 10: biased CKA of independent random 768-d features ~0.44 at n=1000 (~0.88 at n=100); debiased ~0
    a, b = rng(5).normal(size=(1000, 768)), rng(6).normal(size=(1000, 768))
    assert 0.40 < linear_cka(a, b) < 0.48
    assert abs(debiased_cka(a, b)) < 0.01
    assert 0.85 < linear_cka(a[:100], b[:100]) < 0.91


# --------------------------------------------------------------------------------------------------
# RSA
# --------------------------------------------------------------------------------------------------


def test_rankdata_averages_ties():
    np.testing.assert_array_equal(rankdata([10, 20, 10, 30, 20, 20]), [1.5, 4.0, 1.5, 6.0, 4.0, 4.0])
    np.testing.assert_array_equal(rankdata([3.0, 1.0, 2.0]), [3.0, 1.0, 2.0])


def rdm_reference(x: np.ndarray) -> np.ndarray:
    n = len(x)
    return np.array([1 - x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])
                     for i in range(n) for j in range(i + 1, n)])


def test_rsa_against_reference():
    x, y = related(20, 5, seed=7)
    ra, rb = rdm_reference(x), rdm_reference(y)
    assert rsa(x, y) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-10)
    assert rsa(x, y, "spearman") == pytest.approx(np.corrcoef(rankdata(ra), rankdata(rb))[0, 1], abs=1e-10)
    assert rsa(x, x) == pytest.approx(1.0, abs=1e-12)
    # cosine RDMs are invariant to scaling each sentence vector and to rotations
    assert rsa(x * rng(8).uniform(0.5, 2, size=(20, 1)), y @ orthogonal(8)) == pytest.approx(rsa(x, y), abs=1e-10)
    with pytest.raises(ValueError, match="unknown RSA"):
        rsa(x, y, "kendall")


# --------------------------------------------------------------------------------------------------
# Isomorphism (eigenvector similarity)
# --------------------------------------------------------------------------------------------------


def test_knn_graph_and_spectrum():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, -1.0]])
    adj = knn_adjacency(x, 1)
    np.testing.assert_array_equal(adj, adj.T)
    assert (adj.sum(1) >= 1).all() and np.diag(adj).sum() == 0
    eigs = laplacian_spectrum(x, 2)
    assert np.all(np.diff(eigs) <= 1e-12) and eigs[-1] == pytest.approx(0.0, abs=1e-10)  # largest first, min 0
    assert energy_k(np.array([5.0, 3.0, 1.0, 1.0]), 0.8) == 2  # 8/10 >= 0.8
    assert energy_k(np.array([5.0, 3.0, 1.0, 1.0]), 0.81) == 3
    assert eigenvector_similarity(np.array([4.0, 2.0, 0.0]), np.array([3.0, 2.0, 0.0]), 0.5) == 1.0  # k=1


def test_isomorphism_zero_for_isomorphic_graphs():
    x, y = related(80, 6, seed=9)
    assert isomorphism(x, x) == 0.0
    assert isomorphism(x, 3.0 * x @ orthogonal(6) + 2.0) == pytest.approx(0.0, abs=1e-8)
    assert isomorphism(x, x[rng(2).permutation(80)]) == pytest.approx(0.0, abs=1e-8)  # alignment-free
    assert isomorphism(x, y) > 1.0
    assert isomorphism(x, y) == pytest.approx(isomorphism(y, x))


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

LANGS = ["en", "es", "zh"]


def write_encodings(root: Path, variant: str, arrays: dict[str, np.ndarray], language: str | None = None,
                    ids: str = "abc") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for lang, arr in arrays.items():
        np.save(root / f"{lang}.npy", arr.astype(np.float32))
    first = next(iter(arrays.values()))
    meta = {"variant": variant, "language": language, "languages": list(arrays), "n": first.shape[1],
            "layers": list(range(first.shape[0])), "hidden": first.shape[2], "pooling": "mean",
            "padding_fraction": 0.1, "ids_sha256": ids}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def fake_study(root: Path, n: int = 40, d: int = 6, layers: int = 3) -> dict[str, Path]:
    """Full, per-language subnetwork and random encodings of 3 languages sharing a latent signal."""
    r = rng(11)
    latent = r.normal(size=(layers, n, d))
    def reps(noise: float) -> dict[str, np.ndarray]:
        return {lang: latent + noise * (i + 1) * r.normal(size=latent.shape) for i, lang in enumerate(LANGS)}
    paths = {"full": write_encodings(root / "full", "full", reps(0.3)),
             "random": write_encodings(root / "random", "random", {lang: r.normal(size=latent.shape) for lang in LANGS})}
    for lang in LANGS:
        paths[f"sub_{lang}"] = write_encodings(root / f"sub_{lang}", "subnetwork", reps(0.5), language=lang)
    return paths


def run_similarity(tmp: Path, inputs: dict, **params) -> tuple[dict, dict, FakeContext]:
    ctx = FakeContext(tmp, seed=1)
    meta = run_stage(SIMILARITY, params, ctx, inputs)["metrics"]
    doc = json.loads((ctx.output_dir("metrics") / "similarity.json").read_text())
    return doc, dict(meta), ctx


def as_inputs(paths: list[Path], name: str = "encodings") -> dict:
    return {name: [make_input(p, "encodings", name=p.name, point={"n": i}) for i, p in enumerate(paths)]}


def test_similarity_json_layout_and_values(tmp_path):
    paths = fake_study(tmp_path / "enc")
    inputs = as_inputs([paths["full"], paths["sub_en"], paths["sub_es"], paths["sub_zh"]])
    inputs.update(as_inputs([paths["random"]], "random"))  # a second slot: grouped by variant, not by input
    doc, meta, _ = run_similarity(tmp_path / "run", inputs, isomorphism_k=5)
    assert set(doc) == {"languages", "reference", "layers", "models", "pairwise", "layer_by_layer",
                        "isomorphism_method", "n"}
    assert doc["languages"] == LANGS and doc["reference"] == "en" and doc["layers"] == [0, 1, 2] and doc["n"] == 40
    assert doc["models"] == ["full", "subnetwork", "random"]  # no base: absent
    assert "eigenvector similarity" in doc["isomorphism_method"]
    pairs = ["en-es", "en-zh", "es-zh"]
    for model in doc["models"]:
        assert set(doc["pairwise"][model]) == {"cka", "cka_debiased", "rsa", "isomorphism"}
        for values in doc["pairwise"][model].values():
            assert list(values) == pairs and all(len(v) == 3 for v in values.values())
    full = {lang: np.load(paths["full"] / f"{lang}.npy").astype(np.float64) for lang in LANGS}
    got = doc["pairwise"]["full"]
    for layer in range(3):
        x, y = full["en"][layer], full["zh"][layer]
        assert got["cka"]["en-zh"][layer] == pytest.approx(cka_gram(x, y, False), abs=1e-8)
        assert got["cka_debiased"]["en-zh"][layer] == pytest.approx(cka_gram(x, y, True), abs=1e-8)
        assert got["rsa"]["en-zh"][layer] == pytest.approx(rsa(x, y), abs=1e-10)
        assert got["isomorphism"]["en-zh"][layer] == pytest.approx(isomorphism(x, y, k=5), abs=1e-8)
    # subnetwork pairs: a's sentences through a's subnetwork vs b's through b's
    sub = {lang: np.load(paths[f"sub_{lang}"] / f"{lang}.npy").astype(np.float64) for lang in LANGS}
    assert doc["pairwise"]["subnetwork"]["cka"]["es-zh"][2] == pytest.approx(linear_cka(sub["es"][2], sub["zh"][2]))
    # the shared latent signal: full-model languages are more similar than random encodings
    assert min(got["cka_debiased"]["en-es"]) > 0.5
    assert max(abs(v) for v in doc["pairwise"]["random"]["cka_debiased"]["en-es"]) < 0.2
    # layer x layer: rows = full layers, columns = that language's subnetwork layers
    lbl = doc["layer_by_layer"]
    assert list(lbl) == LANGS and np.array(lbl["es"]).shape == (3, 3)
    assert lbl["es"][0][2] == pytest.approx(linear_cka(full["es"][0], sub["es"][2]), abs=1e-10)
    assert lbl["es"][1][1] > lbl["es"][1][0]  # the same layer shares its latent
    assert meta["subnetwork_languages"] == LANGS


def test_similarity_subsets_of_models_measures_and_languages(tmp_path):
    paths = fake_study(tmp_path / "enc")
    inputs = as_inputs([paths["sub_es"], paths["random"], paths["sub_zh"]])
    doc, _, _ = run_similarity(tmp_path / "run", inputs, measures=["cka", "rsa"], reference="es",
                               rsa_method="spearman")
    assert doc["models"] == ["subnetwork", "random"] and doc["layer_by_layer"] == {}
    assert list(doc["pairwise"]["subnetwork"]["cka"]) == ["es-zh"]  # only languages with a subnetwork
    assert set(doc["pairwise"]["random"]) == {"cka", "rsa"}
    doc2, _, _ = run_similarity(tmp_path / "run2", as_inputs([paths["full"]]), languages=["zh", "en"],
                                reference="en", measures=["isomorphism"], isomorphism_max_sentences=20)
    assert doc2["languages"] == ["zh", "en"] and list(doc2["pairwise"]["full"]["isomorphism"]) == ["zh-en"]
    assert "20 sentences" in doc2["isomorphism_method"]


def test_similarity_rejects_inconsistent_inputs(tmp_path):
    paths = fake_study(tmp_path / "enc")
    other = write_encodings(tmp_path / "other", "base", {lang: np.zeros((3, 40, 6)) for lang in LANGS}, ids="xyz")
    with pytest.raises(ValueError, match="different parallel corpora"):
        run_similarity(tmp_path / "a", as_inputs([paths["full"], other]))
    with pytest.raises(ValueError, match="two encodings of variant 'full'"):
        run_similarity(tmp_path / "b", as_inputs([paths["full"], paths["full"]]))
    short = write_encodings(tmp_path / "short", "base", {lang: np.zeros((2, 40, 6)) for lang in LANGS})
    with pytest.raises(ValueError, match="differ in"):
        run_similarity(tmp_path / "c", as_inputs([paths["full"], short]))
    with pytest.raises(ValueError, match="reference 'de'"):
        run_similarity(tmp_path / "d", as_inputs([paths["full"]]), reference="de")


def test_constant_representation_gives_null(tmp_path):
    arrays = {lang: rng(i).normal(size=(2, 30, 4)) for i, lang in enumerate(LANGS)}
    arrays["zh"][0] = 1.0  # layer 0 of zh is constant
    path = write_encodings(tmp_path / "full", "full", arrays)
    doc, _, _ = run_similarity(tmp_path / "run", as_inputs([path]), measures=["cka", "cka_debiased", "rsa"])
    assert doc["pairwise"]["full"]["cka"]["en-zh"][0] is None and doc["pairwise"]["full"]["rsa"]["es-zh"][0] is None
    assert isinstance(doc["pairwise"]["full"]["cka"]["en-zh"][1], float)
