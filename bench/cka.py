"""CKA for every language pair at every layer: ours vs the matrix-product floor vs Gram matrices.

The original study's size: 8 languages, 13 layers (embeddings + 12), 5,000 sentences, 768 dims;
linear CKA between every pair of languages at the same layer = 28 x 13 = 364 comparisons.

- ours: ``stages.measures.cka_matrix`` once per layer, as the ``similarity`` stage calls it (its
  float64 buffers kept from one layer to the next): ``cka_stats`` once per (language, layer) (float64
  centring, ``X^T X`` by BLAS syrk, row norms), then one ``X^T Y`` product per pair, biased and
  debiased CKA from it; the breakdown rows time the two parts apart;
- floor: the same number of X^T Y products of the same (already centred, float64) shapes, nothing
  else (neither centring nor the self products ||X^T X|| that CKA divides by); a second row adds
  the 104 self products (BLAS syrk, half a general product each): what any exact CKA must compute;
- Gram form, as the original computed it: per pair, n x n Gram matrices K = X X^T and L = Y Y^T,
  centred with H = I - 11^T/n, HSIC = tr(K H L H). Too slow to run 364 times, so it is timed on a
  few pairs and the per-pair time is multiplied out (the table says so).

Targets (issue 8): ours within 1.2x of the floor, at least 100x faster than the Gram form.

    python bench/cka.py            # 8 x 13 x 5000 x 768 (about 2-4 minutes on 2 CPUs, ~4 GB RAM)
    python bench/cka.py --quick    # 8 x 13 x 1000 x 256
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from common import header, table, timed, verdict

from stages.measures import center, cka_matrix, cka_pair, cka_stats

LANGUAGES = 8
LAYERS = 13


def gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA through n x n Gram matrices and an explicit centring matrix."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    kh, lh = k @ h, l_ @ h
    hsic_xy = np.trace(kh @ lh)
    return float(hsic_xy / np.sqrt(np.trace(kh @ kh) * np.trace(lh @ lh)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 sentences x 256 dims")
    parser.add_argument("--gram-pairs", type=int, default=2, help="pairs timed with the Gram form")
    args = parser.parse_args()
    n, d = (1000, 256) if args.quick else (5000, 768)
    header(f"CKA: {LANGUAGES} languages x {LAYERS} layers x {n} sentences x {d} dims")
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((n, d)).astype(np.float32)  # some common structure across languages
    reps = [[(shared + rng.standard_normal((n, d)).astype(np.float32)) for _ in range(LAYERS)] for _ in range(LANGUAGES)]
    pairs = list(itertools.combinations(range(LANGUAGES), 2))
    comparisons = len(pairs) * LAYERS

    buffers: list[np.ndarray] = []  # as the stage: one layer's centred matrices, reused by the next
    cka_matrix([reps[lang][0] for lang in range(LANGUAGES)], buffers=buffers)  # warm-up: BLAS threads, buffers
    t0 = time.perf_counter()
    matrices = [cka_matrix([reps[lang][layer] for lang in range(LANGUAGES)], buffers=buffers) for layer in range(LAYERS)]
    t_ours = time.perf_counter() - t0
    ours = [(matrices[layer][0][a, b], matrices[layer][1][a, b]) for a, b in pairs for layer in range(LAYERS)]

    t_stats = t_pairs = 0.0  # the same work, its two parts timed apart, layer by layer
    for layer in range(LAYERS):
        dt, stats = timed(lambda: [cka_stats(reps[lang][layer], buffers[lang]) for lang in range(LANGUAGES)])  # noqa: B023
        t_stats += dt
        t_pairs += timed(lambda: [cka_pair(stats[a], stats[b]) for a, b in pairs])[0]  # noqa: B023
    centred = [[center(x) for x in row] for row in reps]  # the floor's inputs, made before its clock starts
    t0 = time.perf_counter()
    for a, b in pairs:
        for layer in range(LAYERS):
            centred[a][layer].T @ centred[b][layer]
    t_floor = time.perf_counter() - t0
    t0 = time.perf_counter()
    for row in centred:
        for x in row:
            x.T @ x  # numpy calls BLAS syrk for X^T X
    t_self = time.perf_counter() - t0
    del centred

    gram_n = min(args.gram_pairs, comparisons)
    t0 = time.perf_counter()
    gram_values = [gram_cka(reps[a][0].astype(np.float64), reps[b][0].astype(np.float64)) for a, b in pairs[:gram_n]]
    t_gram_each = (time.perf_counter() - t0) / gram_n
    t_gram = t_gram_each * comparisons
    agree = max(abs(g - ours[i * LAYERS][0]) for i, g in enumerate(gram_values))

    print(
        table(
            ["method", "comparisons", "seconds", "ms/comparison", "time / ours"],
            [
                [
                    "ours: cka_matrix per layer (biased + debiased, all pairs)",
                    comparisons,
                    round(t_ours, 3),
                    round(1000 * t_ours / comparisons, 3),
                    1.0,
                ],
                ["  breakdown: cka_stats once per language and layer", LANGUAGES * LAYERS, round(t_stats, 3), "", ""],
                ["  breakdown: cka_pair per comparison", comparisons, round(t_pairs, 3), "", ""],
                [
                    "floor: the same number of X^T Y products",
                    comparisons,
                    round(t_floor, 3),
                    round(1000 * t_floor / comparisons, 3),
                    round(t_floor / t_ours, 3),
                ],
                [
                    "  + the self products X^T X (syrk), once per language and layer",
                    LANGUAGES * LAYERS,
                    round(t_floor + t_self, 3),
                    "",
                    round((t_floor + t_self) / t_ours, 3),
                ],
                [
                    f"Gram form (timed on {gram_n} pairs, x {comparisons})",
                    comparisons,
                    round(t_gram, 1),
                    round(1000 * t_gram_each, 1),
                    round(t_gram / t_ours, 1),
                ],
            ],
        )
    )
    print(f"\nGram form and ours agree to {agree:.1e} on the timed pairs (biased CKA)")
    within = t_ours / t_floor
    print(
        f"target: ours within 1.2x of the floor: {within:.2f}x -> {verdict(within <= 1.2)} "
        f"(the floor excludes centring and the self products, which ours includes)"
    )
    print(
        f"        ours vs the floor plus the self products (the products any exact CKA needs): {t_ours / (t_floor + t_self):.2f}x"
    )
    print(f"target: ours >= 100x faster than the Gram form: {t_gram / t_ours:.0f}x -> {verdict(t_gram / t_ours >= 100)}")


if __name__ == "__main__":
    main()
