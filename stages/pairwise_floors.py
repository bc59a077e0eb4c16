"""The floors of one layer's pairs of representations, for :func:`stages.pairwise.evaluate_layer`.

For every pair (i, j), i < j, the measures with j's rows permuted (:mod:`stages.resampling`, Floors):
``shuffled`` exactly, from the Gram matrices' self terms; ``length_matched`` as the mean over the
language's seeded length-matched permutations. Each permutation of j is applied once to j's Gram
matrix and RDM (an n x n gather, in float32: about 3x faster, with a relative error near 1e-6 on each
cross term, ample for a control) and costs each pair two n x n dot products, less than a ``d_a x d_b``
product whenever n < d^2. The arrays are written into the caller's :class:`stages.pairwise.Workspace`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stages.resampling import Gram, RdmStats, cka_from_cross, shuffled_cka

if TYPE_CHECKING:
    import numpy as np

    from stages.pairwise import MeasureConfig, Workspace

FloorPerms = Sequence["np.ndarray"]  # one language's length-matched permutations of its rows


def _permute_into(m: np.ndarray, perm: np.ndarray, work: Workspace, slot: int) -> np.ndarray:
    """``m[perm][:, perm]`` of a square matrix, written into two scratch buffers (of ``m``'s dtype)
    from slot ``slot``."""
    import numpy as np

    rows = np.take(m, perm, axis=0, out=work.get("scratch", slot, m.shape, m.dtype))
    return np.take(rows, perm, axis=1, out=work.get("scratch", slot + 1, m.shape, m.dtype))


def _single(mats: Sequence[np.ndarray | None], work: Workspace, first: int) -> list[np.ndarray | None]:
    """float32 copies of ``mats`` in the workspace (slots from ``first``): the length-matched floors
    gather and multiply n x n matrices, which float32 does about 3x faster than float64, with a relative
    error near 1e-6 on each cross term (the floors are controls, read to 2-3 digits)."""
    import numpy as np

    out: list[np.ndarray | None] = []
    for i, m in enumerate(mats):
        if m is None:
            out.append(None)
            continue
        buf = work.get("single", first + i, m.shape, np.float32)
        np.copyto(buf, m, casting="same_kind")
        out.append(buf)
    return out


def _permuted_values(
    grams: Sequence[Gram] | None,
    ks: Sequence[np.ndarray | None],
    zs: Sequence[np.ndarray | None] | None,
    i: int,
    j: int,
    rho: np.ndarray,
    kb: np.ndarray | None,
    zb: np.ndarray | None,
) -> dict[str, float]:
    """CKA, debiased CKA and RSA of representation i against j with j's rows permuted by ``rho``
    (``ks``, ``zs``: the Gram matrices and RDMs as compared; ``kb``, ``zb``: j's, already permuted)."""
    import numpy as np

    out: dict[str, float] = {}
    k_i = ks[i] if grams is not None else None
    if grams is not None and k_i is not None and kb is not None:
        cross = float(np.dot(k_i.reshape(-1), kb.reshape(-1)))
        out["cka"], out["cka_debiased"] = cka_from_cross(grams[i], grams[j], cross, grams[j].diag[rho])
    if zs is not None:
        z_i = zs[i]
        out["rsa"] = math.nan if z_i is None or zb is None else 0.5 * float(np.dot(z_i.reshape(-1), zb.reshape(-1)))
    return out


def layer_floors(
    grams: Sequence[Gram] | None,
    rdms: Sequence[RdmStats | None] | None,
    perms: Sequence[FloorPerms | None],
    order: np.ndarray,
    cfg: MeasureConfig,
    work: Workspace,
) -> list[dict[str, dict[str, float]]]:
    """The floors of every pair (i, j), i < j: j's rows permuted. ``shuffled`` is exact; for
    ``length_matched`` each permutation of j (given in corpus order, applied in the matrices' ``order``)
    is gathered once, in float32 (:func:`_single`), and compared with every i < j."""
    import numpy as np

    pairs = list(itertools.combinations(range(len(perms)), 2))
    index = {pair: p for p, pair in enumerate(pairs)}
    matched: list[dict[str, list[float]]] = [{meas: [] for meas in cfg.floor_measures} for _ in pairs]
    ks = _single([g.k for g in grams], work, 0) if grams is not None else []
    zs = _single([None if r is None else r.z for r in rdms], work, len(perms)) if rdms is not None else None
    inverse = np.argsort(order)
    for j in range(1, len(perms)):
        k_j, z_j = (ks[j] if ks else None), (zs[j] if zs is not None else None)
        for perm in perms[j] or ():
            rho = inverse[np.asarray(perm)[order]]  # the permutation in the matrices' row order
            kb = _permute_into(k_j, rho, work, 0) if k_j is not None else None
            zb = _permute_into(z_j, rho, work, 2) if z_j is not None else None
            for i in range(j):
                values = _permuted_values(grams, ks, zs, i, j, rho, kb, zb)
                for meas, found in matched[index[(i, j)]].items():
                    found.append(values[meas])
    result: list[dict[str, dict[str, float]]] = []
    for (i, j), samples in zip(pairs, matched, strict=True):  # samples: measure -> length-matched values
        shuffled: dict[str, float] = {}
        if grams is not None:
            shuffled["cka"], shuffled["cka_debiased"] = shuffled_cka(grams[i], grams[j])
        if rdms is not None:
            shuffled["rsa"] = 0.0 if rdms[i] is not None and rdms[j] is not None else math.nan
        result.append({meas: {"length_matched": float(np.mean(v)) if v else math.nan, "shuffled": shuffled[meas]}
                       for meas, v in samples.items()})
    return result
