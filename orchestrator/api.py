"""The public Python API: a study's results, read from its store, e.g. in a notebook.

    from orchestrator import api

    a = api.artifact("demo.prune.language=en:latest", store=".orchestrator")
    a.ref, a.type, a.metadata, [f.path for f in a.files], a.producer.job_label
    folder = a.download("masks/en")          # copies of its files, each verified against its sha256
    for depth, up in a.lineage():            # the versions it was built from
        print("  " * depth, up.ref, up.type)
    figures = api.artifacts(study="demo", type="figures", store=".orchestrator")
    study = api.study("demo")                # its jobs: state, attempts, log, committed outputs

References: ``NAME:vN`` (a version), ``NAME:latest`` or ``NAME:ALIAS``; a bare ``NAME`` means
its latest version. ``store`` is the storage root (what the CLI's ``--store`` names: the folder
holding ``artifacts/`` and ``studies/``) or the artifact store itself (``<root>/artifacts``);
default ``$ORCHESTRATOR_STORE``, else ``.orchestrator``.

Nothing here writes into the store, so it works on a read-only one (another user's, a mounted
copy): files are copied out of their blobs and verified while copied, not materialized into it.
A reference that names nothing raises ``BadArgument`` (one line: the reference and what exists);
bytes that do not match their digest raise ``CorruptArtifact`` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactError, ArtifactVersion, CorruptArtifact, DamagedRecord, ReadOnlyStore
from orchestrator.artifacts.describe import UpstreamNode, render_tree, tree_dict, upstream_tree, version_dict, walk
from orchestrator.artifacts.download import copy_out, read_verified
from orchestrator.errors import BadArgument
from orchestrator.paths import DEFAULT_STORE, STORE_ENV, StudyPaths, default_root

__all__ = [
    "Artifact",
    "BadArgument",
    "CorruptArtifact",
    "DamagedRecord",
    "File",
    "Job",
    "Lineage",
    "Producer",
    "Study",
    "artifact",
    "artifacts",
    "study",
    "versions",
]

StorePath = str | os.PathLike[str] | None


@dataclass(frozen=True)
class File:
    """One file of a version: its relative path, size in bytes and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Producer:
    """The job that produced a version: its key and label, stage and study, the input versions it
    consumed (``NAME:vN``) and its provenance (params, seed, spec hash, git commit, packages)."""

    job_key: str
    job_label: str
    stage: str
    study: str
    inputs: tuple[str, ...]
    provenance: Mapping[str, Any]


@dataclass(frozen=True, eq=False)
class Artifact:
    """One committed version of an artifact (equal to another when both name the same version
    with the same content)."""

    name: str
    version: int
    type: str
    digest: str  # sha256 over the sorted manifest: same content <=> same digest
    metadata: Mapping[str, Any]
    files: tuple[File, ...]
    aliases: tuple[str, ...]  # "latest" and the custom aliases that name this version
    created_at: str  # ISO 8601, UTC
    producer: Producer | None  # None: logged outside any study
    _store: ReadOnlyStore = field(repr=False)
    _version: ArtifactVersion = field(repr=False)

    @classmethod
    def _of(cls, store: ReadOnlyStore, v: ArtifactVersion) -> Artifact:
        p = v.producer
        producer = (
            None if p is None else Producer(p.job_key, p.job_label, p.stage, p.study, tuple(map(str, p.inputs)), p.provenance)
        )
        files = tuple(File(f.path, f.size, f.sha256) for f in v.files)
        return cls(v.ref.name, v.ref.version, v.type, v.digest, v.metadata, files, v.aliases, v.created_at, producer, store, v)

    @property
    def ref(self) -> str:
        """``NAME:vN``."""
        return f"{self.name}:v{self.version}"

    @property
    def size(self) -> int:
        """Bytes over all its files."""
        return sum(f.size for f in self.files)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Artifact) and (self.ref, self.digest) == (other.ref, other.digest)

    def __hash__(self) -> int:
        return hash((self.ref, self.digest))

    def __repr__(self) -> str:
        n = len(self.files)
        return f"Artifact({self.ref!r}, type={self.type!r}, {n} file{'s' * (n != 1)}, {self.size} bytes)"

    def download(self, dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Copy the files into folder ``dir`` (created; its parents too) and return its absolute
        path. Every byte is checked against the manifest's sha256 while copied: on a mismatch,
        CorruptArtifact names the file and nothing is left behind (the files are gathered in a
        temporary folder next to ``dir``, renamed to ``dir`` once all are verified). ``dir`` must
        not exist, be empty or hold exactly these files already (checked, then kept);
        ``overwrite=True`` replaces anything else in it."""
        return copy_out(self._store, self._version, Path(dir), overwrite=overwrite)

    def read_bytes(self, path: str) -> bytes:
        """The bytes of file ``path`` (as in ``files``), verified against its sha256."""
        return read_verified(self._store, self._version, path)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The text of file ``path``, verified against its sha256."""
        return self.read_bytes(path).decode(encoding)

    def inputs(self) -> list[Artifact]:
        """The versions its producing job consumed, in order (empty if none or no producer);
        DamagedRecord or BadArgument if one can no longer be read (``lineage`` shows the rest)."""
        if self.producer is None:
            return []
        return [_get(self._store, ref) for ref in self.producer.inputs]

    def lineage(self) -> Lineage:
        """This version and, recursively, the versions each one was built from."""
        return Lineage(self._store, upstream_tree(self._store, self._version))

    def to_dict(self, *, files: bool = True) -> dict[str, Any]:
        """JSON-ready: what ``artifacts --show REF --json`` prints."""
        return version_dict(self._version, files=files)


class Lineage:
    """The tree of versions an artifact was built from: the artifact (depth 0), the versions its
    job consumed (depth 1), theirs (depth 2), ...

    - ``for depth, artifact in lineage``: each version once, in the tree's order (depth first,
      inputs in the order consumed); ``len(lineage)`` counts them;
    - ``lineage.find(type="head-mask", stage="prune")``: the versions that match;
    - ``print(lineage)``: the tree as ``artifacts --lineage`` prints it; ``lineage.to_dict()``:
      nested dicts, as ``artifacts --lineage --json``;
    - ``lineage.missing``: versions named as inputs that cannot be read (ref -> why).
    """

    def __init__(self, store: ReadOnlyStore, tree: UpstreamNode) -> None:
        self.tree = tree
        self._entries: list[tuple[int, Artifact]] = []
        self.missing: dict[str, str] = {}
        for depth, node in walk(tree):
            if node.version is None:
                self.missing[str(node.ref)] = node.problem or ""
            elif not node.repeated:
                self._entries.append((depth, Artifact._of(store, node.version)))

    @property
    def root(self) -> Artifact:
        """The artifact whose lineage this is."""
        return self._entries[0][1]

    def __iter__(self) -> Iterator[tuple[int, Artifact]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, *, type: str | None = None, stage: str | None = None, name: str | None = None) -> list[Artifact]:
        """The versions of the tree (the root included) of this type, made by this stage (its id
        in the spec) and of this artifact name; each criterion left out matches all."""
        return [
            a
            for _, a in self._entries
            if (type is None or a.type == type)
            and (stage is None or (a.producer is not None and a.producer.stage == stage))
            and (name is None or a.name == name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return tree_dict(self.tree)

    def __str__(self) -> str:
        return render_tree(self.tree)

    def __repr__(self) -> str:
        return f"Lineage of {self.root.ref} ({len(self)} versions):\n{self}"


@dataclass(frozen=True)
class Job:
    """One job of a submitted study, as its records tell (no scheduler is asked)."""

    key: str
    label: str
    stage: str
    point: Mapping[str, Any]
    state: str  # pending, queued, running, succeeded, cached, failed, timeout, ...; "unknown": no record
    attempt: int | None  # which attempt ran last where retries allow several
    updated_at: str | None
    log: Path | None
    last_error: str | None  # a failed job's: the log line that says why
    outputs: Mapping[str, Artifact]  # output name -> committed version (empty: none committed)


@dataclass(frozen=True)
class Study:
    """A submitted study: its jobs in plan order."""

    name: str
    root: Path
    submitted_at: str
    spec_path: str | None
    jobs: tuple[Job, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        out: dict[str, int] = {}
        for job in self.jobs:
            out[job.state] = out.get(job.state, 0) + 1
        return dict(sorted(out.items()))

    def job(self, label: str) -> Job:
        """The job labelled ``label`` (e.g. ``prune[language=en]``), or BadArgument."""
        found = next((j for j in self.jobs if j.label == label), None)
        if found is None:
            raise BadArgument(f"study {self.name!r} has no job {label!r}; jobs: {', '.join(j.label for j in self.jobs[:12])}")
        return found

    def artifacts(self, type: str | None = None) -> list[Artifact]:
        """Every committed output of its jobs, in plan order (of this type only, given one)."""
        return [a for j in self.jobs for a in j.outputs.values() if type is None or a.type == type]


# --------------------------------------------------------------------------------- functions
def artifact(ref: str, *, store: StorePath = None) -> Artifact:
    """The version ``ref`` names: ``NAME:vN``, ``NAME:latest``, ``NAME:ALIAS`` or ``NAME``
    (latest). BadArgument naming the versions and aliases that exist if there is none."""
    return _get(_open(store)[1], ref)


def versions(name: str, *, store: StorePath = None) -> list[Artifact]:
    """Every version of artifact ``name``, oldest first (BadArgument if it has none)."""
    reader = _open(store)[1]
    _get(reader, name)  # the one-line error naming what exists
    return [Artifact._of(reader, v) for v in reader.versions(name)]


def artifacts(study: str | None = None, *, type: str | None = None, store: StorePath = None) -> list[Artifact]:
    """With ``study``: what its jobs committed, in plan order; without: the latest version of
    every artifact in the store, by name. ``type`` keeps only versions of that type."""
    root, reader = _open(store)
    if study is None:
        found = [reader.get(f"{name}:latest") for name in reader.names()]
    else:
        from orchestrator.overview import study_outputs

        found = study_outputs(StudyPaths(root, study), reader).versions()
    return [Artifact._of(reader, v) for v in found if type is None or v.type == type]


def study(name: str, *, store: StorePath = None) -> Study:
    """Study ``name``'s jobs with their recorded states, logs and committed outputs."""
    from orchestrator.overview import study_status

    root, reader = _open(store)
    status = study_status(StudyPaths(root, name), store=reader)
    jobs = tuple(
        Job(
            j.key,
            j.label,
            j.stage,
            j.point,
            j.state,
            j.attempt,
            j.recorded.updated_at if j.recorded else None,
            j.log,
            j.last_error,
            {out: Artifact._of(reader, v) for out, v in (j.outputs or {}).items()},
        )
        for j in status.jobs
    )
    return Study(status.study, root, status.submitted_at, status.spec_path, jobs)


def _open(store: StorePath) -> tuple[Path, ReadOnlyStore]:
    """(the storage root, its artifact store opened read-only) for a ``store`` argument."""
    given = store if store is not None else default_root()
    path = Path(os.path.abspath(given))
    if (path / "objects").is_dir() and (path / "artifacts").is_dir():  # the artifact store itself
        return path.parent, ReadOnlyStore(path)
    if (path / "artifacts" / "objects").is_dir():
        return path, ReadOnlyStore(path / "artifacts")
    source = "store=" if store is not None else (f"${STORE_ENV}" if os.environ.get(STORE_ENV) else "the default store")
    raise BadArgument(
        f"no artifact store under {path} ({source}): pass store= the storage root (the folder holding artifacts/"
        f" and studies/, what --store names; default ${STORE_ENV} or {DEFAULT_STORE})"
    )


def _get(reader: ReadOnlyStore, ref: str) -> Artifact:
    try:
        return Artifact._of(reader, reader.get(ref if ":" in ref else f"{ref}:latest"))
    except DamagedRecord:
        raise
    except ArtifactError as e:  # no such name, version or alias, or not a reference
        raise BadArgument(str(e)) from None
