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
from .readonly import ReadOnlyStore, ReadOnlyStoreError

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
    "ReadOnlyStore",
    "ReadOnlyStoreError",
    "check_name",
    "file_lock",
    "open_reader",
    "open_store",
]


def open_store(root: Path) -> ArtifactStore:
    """The artifact store under a storage root (``storage.root``)."""
    return LocalStore(root / "artifacts")


def open_reader(root: Path) -> ReadOnlyStore:
    """The artifact store under a storage root, for reading only: nothing is created or written
    (it may be read-only); ArtifactNotFound if there is none."""
    return ReadOnlyStore(root / "artifacts")
