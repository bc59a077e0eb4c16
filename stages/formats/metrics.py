"""The JSON tables that stages hand on as ``metrics`` artifacts, and the model's metrics.json.

Each table is one JSON file named here (the stage that writes it documents its keys):

=========================  ==========================  ==========================================
file                       written by                  read by
=========================  ==========================  ==========================================
``metrics.json``           ``train`` (in the model)    ``report``
``cross_eval.json``/.csv   ``cross_eval``              ``report``, ``sweep_summary``
``mask_stats.json``        ``mask_stats``              ``report``, ``sweep_summary``
``similarity.json``        ``similarity``              ``report``, ``sweep_summary``
``token_overlap.json``     ``token_overlap``           ``report``
``language_distance.json`` ``language_distance``       ``report``
=========================  ==========================  ==========================================

A number that is not finite (an infinite perplexity, a measure of a constant representation) is
written as JSON ``null`` (:func:`finite_or_none`, :func:`json_matrix`), so that every file is strict JSON;
readers take ``null`` as "not computable".
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages._io import read_json

MODEL_METRICS_JSON = "metrics.json"
CROSS_EVAL_JSON = "cross_eval.json"
CROSS_EVAL_CSV = "cross_eval.csv"
MASK_STATS_JSON = "mask_stats.json"
SIMILARITY_JSON = "similarity.json"
TOKEN_OVERLAP_JSON = "token_overlap.json"
LANGUAGE_DISTANCE_JSON = "language_distance.json"


def finite_or_none(obj: Any) -> Any:
    """Replace NaN/inf by None (JSON null), recursively through dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def json_matrix(values: Any) -> Any:
    """A numeric array of any rank as nested lists, non-finite values as null."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        return _finite(float(arr))
    return [json_matrix(v) for v in arr]


def matrix_csv(row_labels: Sequence[str], col_labels: Sequence[str], values: Any, corner: str) -> str:
    """A labelled matrix as CSV text (header ``corner,<cols>``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([corner, *col_labels])
    for label, row in zip(row_labels, values, strict=True):
        w.writerow([label, *(repr(float(v)) for v in row)])
    return buf.getvalue()


def read_table(artifact_dir: Path, file: str) -> Any:
    """The parsed JSON table ``file`` of an artifact directory."""
    return read_json(Path(artifact_dir) / file)
