"""The artifact store interface shared by every backend (local directory store, W&B).

An artifact has a name (``demo.prune.language=en``) and a type (``head-mask``). Each log of it
creates a version ``v0, v1, ...`` unless the content is identical to an existing version, in which
case that version is returned (as W&B does). A version has a manifest of files with sha256 digests,
free-form metadata, aliases, and the lineage of the job that produced it. A job's outputs are
recorded under its job key once all of them are committed, with the exact input versions the job
consumed: that record is what caching and resolution by lineage read.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+\-]*\Z")
REF_RE = re.compile(r"^(?P<name>[^:]+):(?P<alias>[^:]+)\Z")


class ArtifactError(Exception):
    """A store operation failed; the message says which artifact and what to do."""


class ArtifactNotFound(ArtifactError):
    """The named artifact, version, alias or job record does not exist."""


class DamagedRecord(ArtifactError):
    """A record of the store (a version's manifest, a job record, an alias file) cannot be read or
    is invalid; the message names the file, what is wrong with it and how to repair the store."""

    def __init__(self, path: Path | str, problem: str, consequence: str = "") -> None:
        self.path, self.problem, self.consequence = Path(path), problem, consequence
        super().__init__(
            f"damaged record {path}: {problem}; run `python -m orchestrator fsck --repair` to move it to quarantine"
            + (f" ({consequence})" if consequence else "")
        )

    def __reduce__(self) -> tuple[type[DamagedRecord], tuple[Path, str, str]]:  # picklable across processes
        return type(self), (self.path, self.problem, self.consequence)


class CorruptArtifact(ArtifactError):
    """A file of a version is missing from the store or its bytes do not match its manifest."""


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


@dataclass(frozen=True)
class JobCommit:
    """What a job committed: its outputs and the exact input versions it consumed, per input
    binding and in order (None for records written before inputs were recorded)."""

    outputs: dict[str, ArtifactRef]
    inputs: dict[str, tuple[ArtifactRef, ...]] | None


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
        """A read-only directory holding the version's files, verified against their digests
        (created once, then reused; raises CorruptArtifact rather than hand out other bytes)."""

    @abstractmethod
    def modified_view_files(self, ref: ArtifactRef) -> list[str]:
        """The relative paths in ``materialize(ref)``'s directory that were written to, added or
        removed since it was verified (a stage that wrote to its inputs); empty if none."""

    @abstractmethod
    def record_job(
        self,
        job_key: str,
        outputs: Mapping[str, ArtifactRef],
        inputs: Mapping[str, Sequence[ArtifactRef]] | None = None,
    ) -> None:
        """Atomically record that job ``job_key`` produced ``outputs`` (output name -> version)
        from ``inputs`` (input binding -> the versions it consumed, in order)."""

    @abstractmethod
    def job_record(self, job_key: str) -> JobCommit | None:
        """What ``job_key`` committed, or None if it never completed (DamagedRecord if unreadable)."""

    @abstractmethod
    def job_outputs(self, job_key: str) -> dict[str, ArtifactRef] | None:
        """The outputs recorded for ``job_key``, or None if the job never completed."""

    @abstractmethod
    def job_problem(self, job_key: str) -> str | None:
        """None if ``job_key``'s record exists, is readable and every output version it names
        exists with its files in place; else why the job does not count as committed."""

    @abstractmethod
    def outputs_problem(self, outputs: Mapping[str, ArtifactRef]) -> str | None:
        """``job_problem`` for a record already read: None if every version in ``outputs`` (output
        name -> version) exists with its files in place, else what is wrong."""

    @abstractmethod
    def drop_job(self, job_key: str) -> None:
        """Forget ``job_key``'s record (kept aside, not deleted), so that the job runs again."""
