"""Artifact stores: the shared interface and the local directory store."""

from __future__ import annotations

from pathlib import Path

from .base import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    ArtifactVersion,
    CorruptArtifact,
    DamagedRecord,
    FileEntry,
    JobCommit,
    Producer,
    check_name,
)
from .local import FsckReport, LocalStore
from .locking import LockTimeout, file_lock

__all__ = [
    "ArtifactError",
    "ArtifactNotFound",
    "ArtifactRef",
    "ArtifactStore",
    "ArtifactVersion",
    "CorruptArtifact",
    "DamagedRecord",
    "FileEntry",
    "FsckReport",
    "JobCommit",
    "LocalStore",
    "LockTimeout",
    "Producer",
    "check_name",
    "file_lock",
    "open_store",
]


def open_store(root: Path) -> ArtifactStore:
    """The artifact store under a storage root (``storage.root``)."""
    return LocalStore(root / "artifacts")
