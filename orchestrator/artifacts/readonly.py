"""A local store opened for reading only: what ``status``, ``artifacts`` and ``orchestrator.api``
read through, so that they work on a store shared read-only (another user's, a mounted copy).

``LocalStore`` creates its folders when constructed, remembers blob digests in
``cache/hashes.jsonl``, takes lock files and writes verified views into ``materialized/``:
every one of those writes fails on a read-only store. ``ReadOnlyStore`` has only the reading
side (``StoreReader``: resolving references, reading versions and job records, which write
nothing) and refuses every write with ``ReadOnlyStoreError``. Its files are read straight from
their blobs and verified against their digests while they are copied out (``download.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .base import ArtifactError, ArtifactNotFound, ArtifactRef, ArtifactVersion, Producer
from .hashcache import HashCache
from .ingest import BlobWriter
from .reading import StoreReader


class ReadOnlyStoreError(ArtifactError):
    """A write was asked of a store opened read-only."""


class ReadOnlyStore(StoreReader):
    """Reads the local store at ``root`` (the folder holding ``objects/`` and ``artifacts/``)
    without creating, writing, locking or caching anything on disk."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        if not all((self.root / sub).is_dir() for sub in ("objects", "artifacts")):
            raise ArtifactNotFound(f"no artifact store at {self.root} (no objects/ and artifacts/ folders there)")
        # Only its blob paths are used: the cache is never loaded or flushed (nothing is remembered).
        self._blobs = BlobWriter(self.root, HashCache(self.root / "cache" / "hashes.jsonl"))
        self._records = {}

    def __repr__(self) -> str:
        return f"ReadOnlyStore({str(self.root)!r})"

    def blob_path(self, sha: str) -> Path:
        """Where the bytes of digest ``sha`` are stored (read them only through ``download``)."""
        return self._blob(sha)

    def _refuse(self, what: str) -> NoReturn:
        raise ReadOnlyStoreError(f"cannot {what}: the store at {self.root} was opened read-only")

    def log(
        self,
        name: str,
        type: str,
        source: Path,
        *,
        metadata: Mapping[str, Any] | None = None,
        aliases: Sequence[str] = (),
        producer: Producer | None = None,
        move: bool = False,
    ) -> ArtifactVersion:
        """Refused: see the module docstring."""
        self._refuse(f"log artifact {name!r}")

    def materialize(self, ref: ArtifactRef) -> Path:
        """Refused (a view is written into the store): copy the files out with ``download.copy_out``."""
        self._refuse(f"materialize {ref} (copy it out with orchestrator.api or `artifacts get` instead)")

    def modified_view_files(self, ref: ArtifactRef) -> list[str]:
        """No views are made here, so none was modified."""
        return []

    def record_job(
        self,
        job_key: str,
        outputs: Mapping[str, ArtifactRef],
        inputs: Mapping[str, Sequence[ArtifactRef]] | None = None,
    ) -> None:
        """Refused: see the module docstring."""
        self._refuse(f"record job {job_key}")

    def drop_job(self, job_key: str) -> None:
        """Refused: see the module docstring."""
        self._refuse(f"drop job {job_key}")
