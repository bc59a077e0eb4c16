"""Artifact stores: the shared interface and the local directory store."""

from __future__ import annotations

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
]
