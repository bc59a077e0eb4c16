"""The artifact store interface shared by every backend (local directory store, W&B).

An artifact has a name (``demo.prune.language=en``) and a type (``head-mask``). Each log of it
creates a version ``v0, v1, ...`` unless the content is identical to an existing version, in which
case that version is returned (as W&B does). A version has a manifest of files with sha256 digests,
free-form metadata, aliases, and the lineage of the job that produced it. A job's outputs are
recorded under its job key once all of them are committed: that record is what caching and
resolution by lineage read.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+\-]*$")
REF_RE = re.compile(r"^(?P<name>[^:]+):(?P<alias>[^:]+)$")


class ArtifactError(Exception):
    """A store operation failed; the message says which artifact and what to do."""


class ArtifactNotFound(ArtifactError):
    """The named artifact, version, alias or job record does not exist."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid artifact name, else raise ArtifactError."""
    if not NAME_RE.match(name) or len(name) > 128:
        raise ArtifactError(
            f"invalid artifact name {name!r}: use at most 128 letters, digits and . _ = , + - (starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True, order=True)
class ArtifactRef:
    """A specific artifact version, written ``name:vN``."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:v{self.version}"

    @classmethod
    def parse(cls, text: str) -> ArtifactRef:
        m = REF_RE.match(text)
        if not m or not re.fullmatch(r"v\d+", m["alias"]):
            raise ArtifactError(f"not an artifact version reference: {text!r} (expected NAME:vN)")
        return cls(m["name"], int(m["alias"][1:]))


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    sha256: str
    size: int


@dataclass(frozen=True)
class Producer:
    """Lineage: which job produced a version, from which input versions."""

    job_key: str
    study: str
    stage: str
    job_label: str
    inputs: tuple[ArtifactRef, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)  # spec hash, git, packages, seed


@dataclass(frozen=True)
class ArtifactVersion:
    ref: ArtifactRef
    type: str
    digest: str  # sha256 over the sorted manifest: identical content <=> identical digest
    files: tuple[FileEntry, ...]
    metadata: Mapping[str, Any]
    aliases: tuple[str, ...]
    created_at: str  # ISO 8601 UTC
    producer: Producer | None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class ArtifactStore(ABC):
    """What the runner, the planner's cache check and the CLI need from a store."""

    @abstractmethod
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
        """Commit the files under directory ``source`` as a new version (atomically), or return the
        existing version with identical content (adding ``aliases``). ``latest`` always moves.
        ``move=True``: the caller gives the files up (a job's staging output that is deleted
        afterwards), so the store may move them instead of copying them."""

    @abstractmethod
    def get(self, ref: ArtifactRef | str) -> ArtifactVersion:
        """A version by ``ArtifactRef`` or by ``name:vN`` / ``name:alias`` text."""

    @abstractmethod
    def versions(self, name: str) -> list[ArtifactVersion]:
        """Every committed version of ``name``, oldest first."""

    @abstractmethod
    def names(self) -> list[str]:
        """Every artifact name in the store, sorted."""

    @abstractmethod
    def materialize(self, ref: ArtifactRef) -> Path:
        """A read-only directory holding the version's files (created once, then reused)."""

    @abstractmethod
    def record_job(self, job_key: str, outputs: Mapping[str, ArtifactRef]) -> None:
        """Atomically record that job ``job_key`` produced ``outputs`` (output name -> version)."""

    @abstractmethod
    def job_outputs(self, job_key: str) -> dict[str, ArtifactRef] | None:
        """The outputs recorded for ``job_key``, or None if the job never completed."""
