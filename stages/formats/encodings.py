"""Encodings (artifact type ``encodings``): written by ``encode``; read by ``similarity``.

Layout::

    <lang>.npy          float32 (or float16) [layers + 1, n, hidden], row i = sentence i of the corpus
    <lang>.lengths.npy  int32 [n]: sentence i's token count as encoded (special tokens included, after
                        truncation), in the order of <lang>.npy; consumers match sentences by length
    meta.json    {"variant", "language" (mask language or null), "languages", "n",
                  "layers" ([0, 1, ..., L]), "hidden", "pooling", "padding_fraction",
                  "ids_sha256" (of the corpus' sentence ids), "dtype",
                  "max_length" (the limit applied, in tokens),
                  "truncated" ({"<lang>": sentences whose untruncated token count exceeds max_length}),
                  "truncated_total" (their sum over languages),
                  "at_max_length" (sentences of exactly max_length tokens once encoded, cut or not), ...}

``variant`` is one of :data:`stages.formats.names.VARIANTS`; a ``subnetwork`` encoding names its mask's
``language``. ``<lang>.lengths.npy`` and ``truncated`` are new in encode version 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.stage import ResolvedInput
from stages._io import META_FILE, write_json
from stages.formats.names import SUBNETWORK, VARIANTS

if TYPE_CHECKING:
    import numpy as np


def states_file(lang: str) -> str:
    """The file of a language's hidden states."""
    return f"{lang}.npy"


def lengths_file(lang: str) -> str:
    """The file of a language's token counts."""
    return f"{lang}.lengths.npy"


def write_language(out: Path, lang: str, states: np.ndarray, lengths: Any, dtype: str) -> None:
    """Write one language's hidden states (as ``dtype``) and token counts (int32)."""
    import numpy as np

    np.save(out / states_file(lang), states.astype(dtype))
    np.save(out / lengths_file(lang), np.asarray(lengths, dtype=np.int32))


def write_meta(out: Path, meta: Mapping[str, Any]) -> None:
    """Write meta.json (deterministic content only: timings belong in the log and the artifact metadata)."""
    write_json(out / META_FILE, meta)


@dataclass(frozen=True)
class Encodings:
    """An ``encodings`` artifact: its directory and meta.json."""

    path: Path
    meta: Mapping[str, Any]

    @property
    def variant(self) -> str:
        return str(self.meta.get("variant"))

    @property
    def languages(self) -> list[str]:
        return list(self.meta.get("languages") or [])

    def layer(self, lang: str, layer: int) -> np.ndarray:
        import numpy as np

        arr = np.load(self.path / states_file(lang), mmap_mode="r")
        if arr.ndim != 3:
            raise ValueError(f"{self.path}/{lang}.npy: expected [layers, n, hidden], got shape {arr.shape}")
        return np.asarray(arr[layer])  # as stored (float32/float16): each measure casts to float64 as it reads

    def lengths(self, lang: str) -> np.ndarray:
        """Token count of every sentence of ``lang`` as encoded (``<lang>.lengths.npy``, encode version 2)."""
        import numpy as np

        path = self.path / lengths_file(lang)
        if not path.is_file():
            raise ValueError(f"encodings {self.path} ({self.variant}) have no {path.name}, which the length-matched "
                             f"floor needs: re-run encode (version 2 writes it), or set floor_seeds: 0")
        return np.load(path)

    def shape(self, lang: str) -> tuple[int, ...]:
        import numpy as np

        return tuple(np.load(self.path / states_file(lang), mmap_mode="r").shape)


def load_encodings(ri: ResolvedInput) -> Encodings:
    """The :class:`Encodings` of a resolved input (meta.json, else the artifact metadata), checked."""
    meta_path = Path(ri.path) / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else dict(ri.metadata)
    if meta.get("variant") not in VARIANTS:
        raise ValueError(f"encodings {ri.ref}: unknown variant {meta.get('variant')!r}; expected one of {VARIANTS}")
    if meta["variant"] == SUBNETWORK and not meta.get("language"):
        raise ValueError(f"encodings {ri.ref}: a subnetwork encoding must name its mask language")
    return Encodings(Path(ri.path), meta)
