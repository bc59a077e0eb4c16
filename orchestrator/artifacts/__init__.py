"""Artifact stores: the shared interface and the local directory store."""

from __future__ import annotations

from .base import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    ArtifactVersion,
    FileEntry,
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
    "FileEntry",
    "FsckReport",
    "LocalStore",
    "LockTimeout",
    "Producer",
    "check_name",
    "file_lock",
]
