"""Stage ``similarity``: CKA (biased and debiased, feature space) against Gram-matrix references, RSA,
eigenvector similarity, and the stage's similarity.json on hand-made encodings artifacts."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stagekit import FakeContext, make_input, run_stage

from stages.halfsamples import (
    SPREAD_GROUPS,
    difference_interval,
    gram_stats,
    half_sample_interval,
    half_samples,
    isomorphism_interval,
    rdm_stats,
    subset_cka,
    subset_rsa,
)
from stages.measures import (
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
    rdm_square,
    rsa,
    rsa_vector,
)
from stages.resampling import Gram, SeedLike, cka_from_cross, gram, length_matched_permutation, shuffled_cka
from stages.similarity import SIMILARITY

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
    for method in ("pearson", "spearman"):  # the square form holds the same standardised triangle
        square = rdm_square(x, method)
        np.testing.assert_allclose(square[np.triu_indices(20, 1)], rsa_vector(x, method), atol=1e-12)
        np.testing.assert_array_equal(square, square.T)
        assert np.diag(square).max() == 0.0
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
                    ids: str = "abc", lengths: dict[str, np.ndarray] | None = None, extra: dict | None = None) -> Path:
    """An encodings artifact as stage encode writes it; token lengths default to 3 + i % 7 for sentence i
    (``lengths={}``: none, as encode version 1 wrote); ``extra``: more meta.json entries."""
    root.mkdir(parents=True, exist_ok=True)
    for lang, arr in arrays.items():
        np.save(root / f"{lang}.npy", arr.astype(np.float32))
        lang_lengths = (3 + np.arange(arr.shape[1]) % 7) if lengths is None else lengths.get(lang)
        if lang_lengths is not None:
            np.save(root / f"{lang}.lengths.npy", np.asarray(lang_lengths, dtype=np.int32))
    first = next(iter(arrays.values()))
    meta = {"variant": variant, "language": language, "languages": list(arrays), "n": first.shape[1],
            "layers": list(range(first.shape[0])), "hidden": first.shape[2], "pooling": "mean",
            "padding_fraction": 0.1, "ids_sha256": ids, **(extra or {})}
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
                        "layer_by_layer_measure", "layer_by_layer_debiased", "isomorphism_method", "n", "floors",
                        "floors_method", "spread", "spread_difference", "bootstrap", "encodings"}
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
    assert doc["layer_by_layer_measure"] == "cka"
    unbiased = doc["layer_by_layer_debiased"]  # the same matrices with debiased CKA
    assert list(unbiased) == LANGS and np.array(unbiased["zh"]).shape == (3, 3)
    for i, j in itertools.product(range(3), range(3)):
        assert unbiased["zh"][i][j] == pytest.approx(debiased_cka(full["zh"][i], sub["zh"][j]), abs=1e-10)
    assert unbiased["es"][1][1] > unbiased["es"][1][0]
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


# --------------------------------------------------------------------------------------------------
# Floors: shuffled and length-matched partners
# --------------------------------------------------------------------------------------------------


def test_shuffled_floor_is_the_exact_mean_over_all_permutations():
    x, y = related(6, 3, seed=15)
    perms = [np.array(p) for p in itertools.permutations(range(6))]  # all 720
    mean_biased = np.mean([linear_cka(x, y[p]) for p in perms])
    mean_unbiased = np.mean([debiased_cka(x, y[p]) for p in perms])
    biased, unbiased = shuffled_cka(gram(x), gram(y))
    assert biased == pytest.approx(mean_biased, abs=1e-12) and linear_cka(x, y) != pytest.approx(biased, abs=1e-3)
    assert unbiased == 0.0 and mean_unbiased == pytest.approx(0.0, abs=1e-12)
    assert np.mean([rsa(x, y[p]) for p in perms]) == pytest.approx(0.0, abs=1e-12)  # the RSA floor is 0 too


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_matched_permutation_has_no_fixed_points_and_matches_lengths(seed):
    lengths = rng(seed).integers(5, 60, size=400)  # many ties and a few unique lengths at the tails
    perm = length_matched_permutation(lengths, seed)
    assert sorted(perm) == list(range(400)) and not (perm == np.arange(400)).any()
    diff = np.abs(lengths[perm] - lengths)
    assert diff.mean() < 0.1 and diff.max() <= 2
    shuffled = rng(seed).permutation(400)
    assert np.abs(lengths[shuffled] - lengths).mean() > 10  # what a plain shuffle does
    np.testing.assert_array_equal(perm, length_matched_permutation(lengths, seed))


def test_length_matched_permutation_edge_cases():
    unique = np.arange(0, 30, 3)  # no two sentences share a length: neighbours are paired
    perm = length_matched_permutation(unique, 0)
    assert not (perm == np.arange(10)).any() and np.abs(unique[perm] - unique).max() <= 6
    np.testing.assert_array_equal(length_matched_permutation([4, 9], 0), [1, 0])
    lone = np.array([5, 5, 5, 5, 40])  # an outlier joins its nearest group
    perm = length_matched_permutation(lone, 1)
    assert not (perm == np.arange(5)).any() and sorted(perm) == list(range(5))
    assert (np.abs(lone[perm] - lone) > 0).sum() == 2  # only the outlier and its partner differ
    same = np.full(7, 12)
    assert not (length_matched_permutation(same, 2) == np.arange(7)).any()
    with pytest.raises(ValueError, match="at least 2"):
        length_matched_permutation([3], 0)


def test_permuted_cka_equals_cka_of_the_permuted_rows():
    x, y = related(40, 6, seed=12)
    perm = rng(1).permutation(40)
    biased, unbiased = permuted_cka(gram(x), gram(y), perm)
    assert biased == pytest.approx(linear_cka(x, y[perm]), abs=1e-10)
    assert unbiased == pytest.approx(debiased_cka(x, y[perm]), abs=1e-10)


def test_shuffled_floor_matches_random_permutations_at_scale():
    # biased CKA of independent 64-d features at n = 300 is far from 0; its shuffled floor says how far
    a, b = rng(5).normal(size=(300, 64)), rng(6).normal(size=(300, 64))
    ga, gb = gram(a), gram(b)
    sampled = [permuted_cka(ga, gb, rng(s).permutation(300)) for s in range(5)]
    biased, unbiased = shuffled_cka(ga, gb)
    assert 0.15 < biased == pytest.approx(np.mean([f[0] for f in sampled]), rel=0.02)
    assert biased == pytest.approx(linear_cka(a, b), rel=0.05)  # unrelated features sit at the floor
    assert abs(np.mean([f[1] for f in sampled])) < 0.01 and unbiased == 0.0


# --------------------------------------------------------------------------------------------------
# Spread: half-samples of sentence groups
# --------------------------------------------------------------------------------------------------


def test_half_samples_are_complementary_halves_of_random_groups():
    hs = half_samples(63, 8, seed=0, groups=10)
    assert hs.weights.shape == (63, 8) and set(np.unique(hs.weights)) == {0.0, 1.0}
    assert sorted(hs.order) == list(range(63))
    for b in range(0, 8, 2):  # columns come in complementary pairs
        np.testing.assert_array_equal(hs.weights[:, b] + hs.weights[:, b + 1], 1.0)
        both = np.concatenate([hs.members(b), hs.members(b + 1)])
        assert sorted(both) == list(range(63))
    assert all(abs(len(hs.members(b)) - 31.5) <= 3.5 for b in range(8))  # 5 of 10 groups of 6-7
    with pytest.raises(ValueError, match="even"):
        half_samples(63, 7, seed=0)


def test_subset_statistics_equal_direct_recomputation():
    x, y = related(60, 5, seed=13)
    hs = half_samples(60, 6, seed=2, groups=12)
    ga, gb = gram_stats(x, hs), gram_stats(y, hs)
    biased, unbiased = subset_cka(ga, gb, hs)
    ra, rb = rdm_stats(rdm_square(x[hs.order]), hs), rdm_stats(rdm_square(y[hs.order]), hs)
    rsas = subset_rsa(ra, rb, hs)
    for b in range(6):
        s = hs.members(b)
        assert biased[b] == pytest.approx(linear_cka(x[s], y[s]), abs=1e-9)
        assert unbiased[b] == pytest.approx(debiased_cka(x[s], y[s]), abs=1e-9)
        # Pearson RSA of the sub-RDMs (Spearman would re-rank within the subset: see the stage's docs)
        assert rsas[b] == pytest.approx(rsa(x[s], y[s]), abs=1e-9)


def test_cka_interval_contains_the_estimate_and_narrows_with_n():
    def pair(n: int) -> tuple[np.ndarray, np.ndarray]:
        r = rng(n)
        z = r.normal(size=(n, 4))
        return z @ r.normal(size=(4, 8)) + r.normal(size=(n, 8)), z @ r.normal(size=(4, 9)) + r.normal(size=(n, 9))

    widths = {}
    for n in (100, 800):
        x, y = pair(n)
        iv = cka_intervals(x, y, resamples=100, confidence=0.95, seed=0)
        for measure, point in (("cka", linear_cka(x, y)), ("cka_debiased", debiased_cka(x, y))):
            lo, hi = iv[measure]
            assert lo < point < hi
        widths[n] = iv["cka_debiased"][1] - iv["cka_debiased"][0]
    assert widths[800] < 0.6 * widths[100]  # ~ 1 / sqrt(8) = 0.35


def test_cka_interval_matches_the_spread_over_independent_samples():
    r = rng(17)
    mix_x, mix_y = r.normal(size=(3, 6)), r.normal(size=(3, 7))

    def sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
        s = rng(100 + seed)
        z = s.normal(size=(150, 3))
        return z @ mix_x + s.normal(size=(150, 6)), z @ mix_y + 1.5 * s.normal(size=(150, 7))

    truth_sd = np.std([debiased_cka(*sample(i)) for i in range(60)], ddof=1)
    half_widths = [np.diff(cka_intervals(*sample(i), resamples=200, seed=i)["cka_debiased"])[0] / 2 for i in range(6)]
    ratio = np.mean(half_widths) / (1.96 * truth_sd)
    assert 0.6 < ratio < 1.6


def test_half_sample_interval_needs_finite_values():
    hs = half_samples(20, 4, seed=0, groups=4)
    assert half_sample_interval(0.5, np.array([0.4, 0.6, 0.5, 0.5]), hs, 0.95) is not None
    assert half_sample_interval(0.5, np.array([0.4, np.nan, 0.5, 0.5]), hs, 0.95) is None
    assert half_sample_interval(math.nan, np.array([0.4, 0.6, 0.5, 0.5]), hs, 0.95) is None


# --------------------------------------------------------------------------------------------------
# Isomorphism: the authors' variant and the spread over subsets
# --------------------------------------------------------------------------------------------------


def test_isomorphism_authors_code_variant():
    x, y = related(60, 6, seed=14)
    eigs = laplacian_spectrum(x, 1, variant="authors_code")
    assert np.all(np.diff(eigs) >= -1e-12) and eigs[0] == pytest.approx(0.0, abs=1e-10)  # smallest first
    # 1-NN graph of the normalised, centred, renormalised vectors
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    u = u - u.mean(0)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    manual = np.zeros((60, 60))
    manual[np.arange(60), sim.argmax(1)] = 1
    np.testing.assert_array_equal(knn_adjacency(x, 1, variant="authors_code"), np.maximum(manual, manual.T))
    # the first normalisation makes it blind to each vector's length
    scaled = x * rng(3).uniform(0.2, 5.0, size=(60, 1))
    assert isomorphism(x, scaled, k=1, variant="authors_code") == pytest.approx(0.0, abs=1e-9)
    assert isomorphism(x, y, k=1, variant="authors_code") != pytest.approx(isomorphism(x, y, k=1), abs=1e-6)
    with pytest.raises(ValueError, match="isomorphism variant"):
        knn_adjacency(x, 1, variant="nope")


def test_isomorphism_interval():
    lo, hi = isomorphism_interval(10.0, np.array([8.0, 12.0, 9.0, 11.0]), m=50, n=200, confidence=0.95)
    sd = np.std([8.0, 12.0, 9.0, 11.0], ddof=1) / math.sqrt(1 - 50 / 200)  # finite-population correction
    assert (lo, hi) == (pytest.approx(10.0 - 1.959964 * sd, rel=1e-5), pytest.approx(10.0 + 1.959964 * sd, rel=1e-5))
    assert isomorphism_interval(1.0, np.array([0.0, 9.0]), m=50, n=200, confidence=0.95)[0] == 0.0  # a distance
    assert isomorphism_interval(10.0, np.array([8.0, 12.0]), m=200, n=200, confidence=0.95) is None  # one subset
    assert isomorphism_interval(10.0, np.array([8.0]), m=50, n=200, confidence=0.95) is None


# --------------------------------------------------------------------------------------------------
# The stage: floors, spreads, lengths
# --------------------------------------------------------------------------------------------------


def test_similarity_floors_and_spreads_layout(tmp_path):
    paths = fake_study(tmp_path / "enc")
    inputs = as_inputs([paths["full"], paths["random"], paths["sub_en"], paths["sub_es"], paths["sub_zh"]])
    doc, meta, _ = run_similarity(tmp_path / "run", inputs, isomorphism_k=5, isomorphism_max_sentences=20,
                                  bootstrap=40, isomorphism_resamples=4)
    pairs = ["en-es", "en-zh", "es-zh"]
    assert doc["bootstrap"]["resamples"] == 40 and doc["bootstrap"]["confidence"] == 0.95
    assert doc["bootstrap"]["unit"] == "sentences" and "half" in doc["bootstrap"]["method"]
    assert "length" in doc["floors_method"]
    for model in ("full", "subnetwork", "random"):
        assert set(doc["floors"][model]) == {"cka", "cka_debiased", "rsa"}
        for measure in ("cka", "cka_debiased", "rsa"):
            for kind in ("length_matched", "shuffled"):
                curves = doc["floors"][model][measure][kind]
                assert list(curves) == pairs and all(len(v) == 3 and all(isinstance(f, float) for f in v)
                                                     for v in curves.values())
        assert set(doc["spread"][model]) == {"cka", "cka_debiased", "rsa", "isomorphism"}
        for measure, curves in doc["spread"][model].items():
            assert list(curves) == pairs
            for pair, intervals in curves.items():
                for layer, (lo, hi) in enumerate(intervals):
                    assert lo <= doc["pairwise"][model][measure][pair][layer] <= hi, (model, measure, pair)
    full = doc["floors"]["full"]["cka_debiased"]
    # the full model's shared latent is far above its floors; random encodings sit at theirs (~0)
    assert min(doc["pairwise"]["full"]["cka_debiased"]["en-es"]) > max(full["shuffled"]["en-es"]) + 0.4
    assert doc["floors"]["random"]["cka_debiased"]["shuffled"]["en-zh"] == [0.0, 0.0, 0.0]  # exact
    assert max(abs(v) for v in doc["floors"]["random"]["cka_debiased"]["length_matched"]["en-zh"]) < 0.2
    assert all(0.1 < v < 0.5 for v in doc["floors"]["random"]["cka"]["shuffled"]["en-zh"])  # n = 40, d = 6
    assert meta["floor_seeds"] == 3 and meta["bootstrap"] == 40


def test_similarity_spread_and_floors_can_be_switched_off(tmp_path):
    paths = fake_study(tmp_path / "enc")
    old = write_encodings(tmp_path / "old", "full", {lang: np.load(paths["full"] / f"{lang}.npy") for lang in LANGS},
                          lengths={})  # encode version 1: no <lang>.lengths.npy
    doc, _, _ = run_similarity(tmp_path / "a", as_inputs([old]), bootstrap=0, floor_seeds=0)
    assert doc["floors"] == {} and doc["spread"] == {} and doc["bootstrap"]["resamples"] == 0
    with pytest.raises(ValueError, match="re-run encode"):
        run_similarity(tmp_path / "b", as_inputs([old]))
    doc2, _, _ = run_similarity(tmp_path / "c", as_inputs([paths["full"]]), measures=["isomorphism"])
    assert doc2["floors"] == {}  # isomorphism ignores the alignment: it has no floor
    assert doc2["spread"]["full"]["isomorphism"]["en-es"] == [None, None, None]  # 40 of 40 sentences: one subset
    with pytest.raises(ValueError, match="even"):
        run_similarity(tmp_path / "d", as_inputs([paths["full"]]), bootstrap=5)


def planted_length_study(root: Path, n: int = 240, d: int = 10) -> dict[str, Path]:
    """Sentence length written into every language's features (as mean-pooled position embeddings do),
    translations of similar length; the "full" model adds a shared meaning signal, "random" has none."""
    r = rng(21)
    base = r.integers(4, 40, size=n)
    lengths = {lang: np.clip(base + r.integers(-2, 3, size=n), 3, None) for lang in LANGS}
    meaning = r.normal(size=(n, d))

    def reps(shared: float) -> dict[str, np.ndarray]:
        out = {}
        for lang in LANGS:
            size = (lengths[lang] - 20.0) / 10.0
            layer = [np.outer(size, r.normal(size=d)) + shared * meaning @ r.normal(size=(d, d)) / math.sqrt(d)
                     + r.normal(size=(n, d)) for _ in range(2)]
            out[lang] = np.stack(layer)
        return out

    return {"full": write_encodings(root / "full", "full", reps(3.0), lengths=lengths),
            "random": write_encodings(root / "random", "random", reps(0.0), lengths=lengths)}


def test_length_matched_floor_catches_a_length_artefact(tmp_path):
    paths = planted_length_study(tmp_path / "enc")
    doc, _, _ = run_similarity(tmp_path / "run", as_inputs([paths["full"], paths["random"]]),
                               measures=["cka", "cka_debiased", "rsa"], bootstrap=0)
    for pair in ("en-es", "en-zh", "es-zh"):
        for layer in range(2):
            rand = doc["pairwise"]["random"]["cka_debiased"][pair][layer]
            floors = doc["floors"]["random"]["cka_debiased"]
            matched, shuffled = floors["length_matched"][pair][layer], floors["shuffled"][pair][layer]
            assert abs(shuffled) < 0.05 < 0.2 < matched  # the length signal survives length-matched partners
            assert rand == pytest.approx(matched, abs=0.1)  # the random model's similarity is all length
            full = doc["pairwise"]["full"]["cka_debiased"][pair][layer]
            assert full > doc["floors"]["full"]["cka_debiased"]["length_matched"][pair][layer] + 0.2
            assert doc["floors"]["random"]["rsa"]["length_matched"][pair][layer] > \
                doc["floors"]["random"]["rsa"]["shuffled"][pair][layer] + 0.1


def test_stage_floors_equal_the_reference_on_the_same_permutations(tmp_path):
    paths = fake_study(tmp_path / "enc")
    doc, _, _ = run_similarity(tmp_path / "run", as_inputs([paths["full"]]), measures=["cka", "cka_debiased", "rsa"],
                               bootstrap=10, floor_seeds=2)
    full = {lang: np.load(paths["full"] / f"{lang}.npy").astype(np.float64) for lang in LANGS}
    lengths = np.load(paths["full"] / "zh.lengths.npy")
    perms = [length_matched_permutation(lengths, (1, 2, s)) for s in range(2)]  # the job's seed is 1
    floors = doc["floors"]["full"]
    for layer in range(3):
        x, y = full["es"][layer], full["zh"][layer]
        ref = [permuted_cka(gram(x), gram(y), p) for p in perms]
        assert floors["cka"]["length_matched"]["es-zh"][layer] == pytest.approx(np.mean([r[0] for r in ref]), abs=1e-5)
        assert floors["cka_debiased"]["length_matched"]["es-zh"][layer] == pytest.approx(
            np.mean([r[1] for r in ref]), abs=1e-5)
        assert floors["rsa"]["length_matched"]["es-zh"][layer] == pytest.approx(
            np.mean([rsa(x, y[p]) for p in perms]), abs=1e-5)
        assert floors["cka"]["shuffled"]["es-zh"][layer] == pytest.approx(shuffled_cka(gram(x), gram(y))[0], abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Paired intervals of differences between models; what encode recorded about truncation
# --------------------------------------------------------------------------------------------------


def _quantile_interval(point: float, values: np.ndarray, sizes: np.ndarray, n: int, confidence: float = 0.95):
    """The half-sample interval recomputed from its definition (np.quantile, linear rule)."""
    dev = (values - values.mean()) * np.sqrt(sizes / (n - sizes))
    lo, hi = np.quantile(dev, [(1 - confidence) / 2, (1 + confidence) / 2])
    return point + lo, point + hi


def test_paired_difference_interval_is_narrow_for_correlated_models_and_equals_recomputation():
    # a "subnetwork" that is the "full model" plus a little noise: across half-samples the two models'
    # CKAs move together, so their difference varies far less than either
    n = 200
    r = rng(31)
    z = r.normal(size=(n, 3))
    xf = z @ r.normal(size=(3, 8)) + r.normal(size=(n, 8))
    yf = z @ r.normal(size=(3, 9)) + 1.2 * r.normal(size=(n, 9))
    xs, ys = xf + 0.15 * r.normal(size=xf.shape), yf + 0.15 * r.normal(size=yf.shape)
    paired = cka_difference_intervals(xs, ys, xf, yf, resamples=200, seed=4)
    alone = [cka_intervals(a, b, resamples=200, seed=4) for a, b in ((xs, ys), (xf, yf))]
    hs = half_samples(n, 200, 4)
    for measure, fn in (("cka", linear_cka), ("cka_debiased", debiased_cka)):
        lo, hi = paired[measure]
        point = fn(xs, ys) - fn(xf, yf)
        assert lo < point < hi
        quadrature = 2 * math.hypot(*(np.diff(iv[measure])[0] / 2 for iv in alone))
        assert hi - lo < 0.3 * quadrature, measure  # the same sentences: much narrower than independent
        diffs = np.array([fn(xs[s], ys[s]) - fn(xf[s], yf[s]) for s in map(hs.members, range(200))])
        assert (lo, hi) == pytest.approx(_quantile_interval(point, diffs, hs.sizes, n), abs=1e-9)


def test_similarity_spread_difference_is_paired_over_the_same_half_samples(tmp_path):
    paths = fake_study(tmp_path / "enc")
    inputs = as_inputs([paths["full"], paths["random"], paths["sub_en"], paths["sub_es"], paths["sub_zh"]])
    doc, _, _ = run_similarity(tmp_path / "run", inputs, isomorphism_k=5, isomorphism_max_sentences=20, bootstrap=10,
                               isomorphism_resamples=4, floor_seeds=0)
    assert set(doc["spread_difference"]) == {"subnetwork-full", "random-full"}
    pairs = ["en-es", "en-zh", "es-zh"]
    for key, per_measure in doc["spread_difference"].items():
        model = key.removesuffix("-full")
        assert set(per_measure) == {"cka", "cka_debiased", "rsa", "isomorphism"}
        for measure, curves in per_measure.items():
            assert list(curves) == pairs
            for pair, intervals in curves.items():
                for layer, (lo, hi) in enumerate(intervals):
                    d = doc["pairwise"][model][measure][pair][layer] - doc["pairwise"]["full"][measure][pair][layer]
                    assert lo <= d + 1e-12 and d - 1e-12 <= hi, (key, measure, pair)
    # recomputed: the stage's half-samples (seed (job seed, 3)), each model's measure on every half
    hs = half_samples(40, 10, (1, 3))
    full = {lang: np.load(paths["full"] / f"{lang}.npy").astype(np.float64) for lang in LANGS}
    sub = {lang: np.load(paths[f"sub_{lang}"] / f"{lang}.npy").astype(np.float64) for lang in LANGS}
    for layer in range(3):
        for measure, fn in (("cka_debiased", debiased_cka), ("rsa", rsa)):
            def on_halves(reps, fn=fn, layer=layer):
                return np.array([fn(reps["en"][layer][s], reps["zh"][layer][s]) for s in map(hs.members, range(10))])
            point = fn(sub["en"][layer], sub["zh"][layer]) - fn(full["en"][layer], full["zh"][layer])
            expected = _quantile_interval(point, on_halves(sub) - on_halves(full), hs.sizes, 40)
            got = doc["spread_difference"]["subnetwork-full"][measure]["en-zh"][layer]
            assert got == pytest.approx(list(expected), abs=1e-9), (measure, layer)
    # isomorphism: the same other subsets for both models; a difference of distances is not cut at 0
    iso = doc["spread_difference"]["random-full"]["isomorphism"]["en-es"]
    assert all(iv is not None and iv[0] < iv[1] for iv in iso)


def test_spread_difference_is_empty_without_half_samples_or_a_full_model(tmp_path):
    paths = fake_study(tmp_path / "enc")
    doc, _, _ = run_similarity(tmp_path / "a", as_inputs([paths["full"], paths["sub_en"], paths["sub_es"]]),
                               bootstrap=0, measures=["cka"])
    assert doc["spread_difference"] == {}
    doc, _, _ = run_similarity(tmp_path / "b", as_inputs([paths["random"], paths["sub_en"], paths["sub_es"]]),
                               bootstrap=4, measures=["cka"], floor_seeds=0)
    assert doc["spread_difference"] == {}  # nothing to subtract from


def test_similarity_copies_what_encode_recorded_about_truncation(tmp_path):
    r = rng(2)
    arrays = {lang: r.normal(size=(2, 30, 4)) for lang in LANGS}
    cut = {"max_length": 64, "truncated": {"en": 0, "es": 2, "zh": 5, "ar": 9}, "truncated_total": 16}
    full = write_encodings(tmp_path / "full", "full", arrays, extra=cut)
    sub = write_encodings(tmp_path / "sub_zh", "subnetwork", arrays, language="zh", extra=cut)
    old = write_encodings(tmp_path / "base", "base", arrays)  # encode version 1: no truncation recorded
    doc, _, _ = run_similarity(tmp_path / "run", as_inputs([full, sub, old]), measures=["cka"], bootstrap=0,
                               floor_seeds=0)
    # the counts of the languages compared, read from each artifact (a subnetwork's: its own language)
    assert doc["encodings"] == {
        "full": {"max_length": 64, "truncated": {"en": 0, "es": 2, "zh": 5}, "truncated_total": 7, "n": 30},
        "base": {"max_length": None, "truncated": None, "truncated_total": None, "n": 30},
        "subnetwork:zh": {"max_length": 64, "truncated": {"zh": 5}, "truncated_total": 5, "n": 30},
    }


# (a helper only these tests use, moved here from the package)
def permuted_cka(a: Gram, b: Gram, perm: np.ndarray) -> tuple[float, float]:
    """(linear CKA, debiased linear CKA) of X_a against Y_b with its rows permuted (``Y_b[perm]``, in the
    Grams' row order). A permutation leaves Y's column means and self terms unchanged, so only
    ``||Xc^T Yc[perm]||_F^2 = sum_ij K_a[i, j] K_b[perm i, perm j]`` is new: an n^2 gather and dot
    product, cheaper than the d_a x d_b product whenever n < d^2."""
    import numpy as np

    kb = b.k.take(perm, axis=0).take(perm, axis=1)
    return cka_from_cross(a, b, float(np.dot(a.k.reshape(-1), kb.reshape(-1))), b.diag[perm])


# (a helper only these tests use, moved here from the package)
def cka_intervals(
    x: Any, y: Any, *, resamples: int = 200, confidence: float = 0.95, seed: SeedLike = 0,
    groups: int = SPREAD_GROUPS,
) -> dict[str, tuple[float, float] | None]:
    """Half-sample intervals of linear and debiased linear CKA of two representations of the same sentences."""
    import numpy as np

    hs = half_samples(np.shape(x)[0], resamples, seed, groups)
    biased, unbiased = subset_cka(gram_stats(x, hs), gram_stats(y, hs), hs)
    return {"cka": half_sample_interval(linear_cka(x, y), biased, hs, confidence),
            "cka_debiased": half_sample_interval(debiased_cka(x, y), unbiased, hs, confidence)}


def cka_difference_intervals(
    x_a: Any, y_a: Any, x_b: Any, y_b: Any, *, resamples: int = 200, confidence: float = 0.95, seed: SeedLike = 0,
    groups: int = SPREAD_GROUPS,
) -> dict[str, tuple[float, float] | None]:
    """Paired half-sample intervals of CKA(x_a, y_a) - CKA(x_b, y_b) (linear and debiased), four
    representations of the same sentences (e.g. a subnetwork's and the full model's, of two languages)."""
    import numpy as np

    hs = half_samples(np.shape(x_a)[0], resamples, seed, groups)
    sub_a = subset_cka(gram_stats(x_a, hs), gram_stats(y_a, hs), hs)
    sub_b = subset_cka(gram_stats(x_b, hs), gram_stats(y_b, hs), hs)
    return {"cka": difference_interval(linear_cka(x_a, y_a), sub_a[0], linear_cka(x_b, y_b), sub_b[0], hs, confidence),
            "cka_debiased": difference_interval(debiased_cka(x_a, y_a), sub_a[1], debiased_cka(x_b, y_b), sub_b[1], hs,
                                                confidence)}
