"""The local directory artifact store: content-addressed blobs, atomically committed versions.

Layout under the store root::

    objects/ab/cdef...                  file blobs, named by sha256, read-only, written once
    artifacts/<name>/versions/v<N>/version.json   one committed version (immutable)
    artifacts/<name>/aliases.json       {"alias": N} for custom aliases (``latest`` is implicit)
    artifacts/<name>/lock               lock file: version allocation and alias updates
    jobs/<job_key>.json                 the outputs a job committed
    materialized/<name>/v<N>/...        read-only hardlinked view of a version's files
    tmp/<host>-<pid>-<unique>.<kind>    staging; anything left here after a crash is garbage

A version becomes visible by a single ``rename`` of a complete staging directory, after every blob
it references is durably in place, so readers never see a half-written version, even after SIGKILL
or a power loss. How ``log`` gets there, reading each source file once:

1. Ingest, file by file on a thread pool: a file whose digest is remembered (``HashCache``) and
   whose blob exists is not read at all. Any other file is read once; the same bytes are hashed
   and written to a temporary blob in ``tmp/`` (the digest is known only at the end, so it cannot
   go to its address directly). With ``move=True`` a file the store may take (same filesystem,
   one link, not a symlink) is only hashed, in place: it will be renamed, not copied.
2. Barrier 1: the bytes of every temporary blob and taken file reach stable storage.
3. Place: rename each into ``objects/`` unless a blob of that digest exists already.
4. Barrier 2: those names, and the staged ``version.json``, reach stable storage.
5. Commit, under the artifact's lock: rename the staging directory to ``versions/vN``, fsync
   ``versions/`` (the commit point), then update aliases.

Why this order is enough (crash = SIGKILL or power loss at any point):

- Barrier 1 before step 3 keeps the store's invariant that a name in ``objects/`` always holds its
  complete content: on ext4 and the like, a file renamed before its data is written can come back
  from a power loss empty under its final name, and later logs would trust it (they skip existing
  blobs). Renaming over an existing blob (two loggers racing) is harmless: both are complete,
  durable and identical.
- Barrier 2 before step 5 makes every blob name the version refers to durable before the version's
  own name can be, including blobs placed by another process whose own barrier has not run yet.
- A crash before step 5 leaves only garbage in ``tmp/`` (``fsck`` removes it) and complete but
  unreferenced blobs, which are harmless; a rerun logs the same content again.

A barrier is one ``syncfs`` of the store's filesystem where the OS has it (one journal commit and
one device flush, however many files), else an fsync of each file and directory concerned. Large
files start their writeback while they are being copied, so barrier 1 mostly finds them on disk.
Steps 1-3 are ``ingest.BlobWriter``'s; this module keeps the versions, aliases, reads and fsck.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import fsutil
from .base import (
    NAME_RE,
    REF_RE,
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    ArtifactVersion,
    FileEntry,
    Producer,
    check_name,
)
from .hashcache import HashCache, sha256_file
from .ingest import IO_THREADS, LINK_FALLBACK_ERRNOS, BlobWriter, Ingested, discard, list_source
from .locking import file_lock

LATEST = "latest"
VERSION_DIR_RE = re.compile(r"^v(\d+)$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+\-]{0,127}$")
JOB_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
# The head of a version record, in the compact format and in the indented one of older stores.
_RECORD_DIGEST_RE = re.compile(rb'\{\s*"created_at":\s*"[^"]*",\s*"digest":\s*"([0-9a-f]{64})"')


@dataclass
class FsckReport:
    """What ``LocalStore.fsck`` found; only ``removed_temp`` was acted on."""

    removed_temp: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # "name:vN: reason"
    dangling_jobs: list[str] = field(default_factory=list)  # "job_key: reason"

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.dangling_jobs


def _write_synced(path: Path, text: str) -> None:
    with open(path, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def manifest_digest(files: Sequence[FileEntry]) -> str:
    """sha256 over the canonical sorted manifest (path, sha256, size); metadata is not part of it."""
    rows = sorted([f.path, f.sha256, f.size] for f in files)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _to_json(value: Any, what: str) -> str:
    """Compact JSON: with ``indent``, json falls back from its C encoder to pure Python, 5x slower
    (30 ms for the record of 2,000 files)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{what} is not JSON-serialisable ({e}); use str, int, float, bool, None, lists and dicts") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(items: Sequence[str], limit: int = 12) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class LocalStore(ArtifactStore):
    """An artifact store in a directory, safe for concurrent processes (also on NFS)."""

    def __init__(self, root: Path | str, *, lock_timeout_s: float | None = 600.0) -> None:
        self.root = Path(root).resolve()
        self.lock_timeout_s = lock_timeout_s
        self._hashes = HashCache(self.root / "cache" / "hashes.jsonl")
        for sub in ("objects", "artifacts", "jobs", "materialized", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._blobs = BlobWriter(self.root, self._hashes)
        self._types: dict[str, str] = {}  # artifact name -> type of its first version

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ----------------------------------------------------------------- paths and small helpers
    def _blob(self, sha: str) -> Path:
        return Path(self._blobs.blob_path(sha))

    def _art_dir(self, name: str) -> Path:
        return self.root / "artifacts" / check_name(name)

    def _tmp(self, kind: str) -> Path:
        return Path(self._blobs.tmp_path(kind))

    def _write_atomic(self, dest: Path, text: str) -> None:
        tmp = self._tmp("file")
        _write_synced(tmp, text)
        os.replace(tmp, dest)
        fsutil.fsync_path(dest.parent)

    def _version_numbers(self, name: str) -> list[int]:
        vdir = self._art_dir(name) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(int(m[1]) for e in os.listdir(vdir) if (m := VERSION_DIR_RE.match(e)))

    def _aliases(self, name: str) -> dict[str, int]:
        path = self._art_dir(name) / "aliases.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # ------------------------------------------------------------------------------ logging
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
        """Commit the files under ``source`` as version ``name:vN`` (N = 1 + the newest), or return
        the existing version with the same content digest (then ``metadata`` and ``producer`` are
        ignored and only ``aliases`` are added). ``latest`` always names the newest version.

        ``move=True`` hands the files over to the store: each one it can take (a regular file on
        the store's filesystem with no other hard link) is renamed into the store instead of
        copied, and made read-only first. Use it for a directory that is discarded afterwards,
        such as a job's staging output, and write nothing to it once ``log`` has begun. Files that
        cannot be taken (symlinks, hard-linked files, another filesystem) and files whose content
        is already stored are copied or skipped and left where they are. If the log fails, some
        files may be in the store already and gone from ``source``: recreate it to log again."""
        self._check_type(name, type, self._version_numbers(name))  # checked again under the lock
        new_aliases = [self._check_alias(a) for a in aliases if a != LATEST]
        record = {"type": type, "metadata": dict(metadata or {}), "producer": self._producer_to_dict(producer)}
        _to_json(record, f"metadata/provenance of artifact {name!r}")  # fail before touching any file
        sources = list_source(source)
        number = self._unchanged_version(name, sources)
        if number is not None:  # an identical re-log, told from the listing alone
            self._add_aliases(name, number, new_aliases)
            return self.get(ArtifactRef(name, number))
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            try:
                items = self._blobs.ingest_all(pool, sources, move)
            finally:
                self._hashes.flush()  # the digests read, whether or not this log commits
            try:
                files = [FileEntry(i.rel, i.sha, i.size) for i in items]
                number = self._commit_files(pool, name, record, files, items, new_aliases)
            finally:
                discard(items)  # left over if deduplicated or failed
        return self.get(ArtifactRef(name, number))

    def _commit_files(
        self,
        pool: ThreadPoolExecutor,
        name: str,
        record: dict[str, Any],
        files: list[FileEntry],
        items: Sequence[Ingested],
        aliases: Sequence[str],
    ) -> int:
        """Steps 2-5 for the ingested ``items``, unless a version with their digest exists already
        (then only ``aliases`` are set on it). ``record`` holds type, metadata and producer."""
        digest = manifest_digest(files)
        number, checked = self._find_digest(name, digest)
        if number is not None:  # identical content: nothing to write
            self._add_aliases(name, number, aliases)
            return number
        self._blobs.place_all(pool, items)
        record = {
            **record,
            "digest": digest,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files],
            "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        }
        staging = self._stage_version(pool, _to_json(record, f"metadata/provenance of artifact {name!r}"), files)
        try:
            with file_lock(self._art_dir(name) / "lock", self.lock_timeout_s):
                number = self._commit(name, record["type"], digest, staging, checked)
                if aliases:
                    self._set_aliases(name, number, aliases)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # renamed away unless deduplicated/failed
        return number

    @staticmethod
    def _check_alias(alias: str) -> str:
        if not ALIAS_RE.match(alias) or VERSION_DIR_RE.match(alias):
            raise ArtifactError(
                f"invalid alias {alias!r}: use up to 128 letters, digits and . _ = , + -, starting with a"
                " letter or digit, and not of the form vN (that names a version)"
            )
        return alias

    @staticmethod
    def _producer_to_dict(producer: Producer | None) -> dict[str, Any] | None:
        if producer is None:
            return None
        return {
            "job_key": producer.job_key,
            "study": producer.study,
            "stage": producer.stage,
            "job_label": producer.job_label,
            "inputs": [str(r) for r in producer.inputs],
            "provenance": dict(producer.provenance),
        }

    def _unchanged_version(self, name: str, sources: Sequence[tuple[str, str, os.stat_result]]) -> int | None:
        """The version of ``name`` with exactly these files, if every file's digest is remembered:
        then no file is read and no blob looked at (a committed version's blobs are in place)."""
        shas = [self._hashes.known(st) for _, _, st in sources]
        if any(sha is None for sha in shas):
            return None
        files = [FileEntry(rel, sha, st.st_size) for (rel, _, st), sha in zip(sources, shas, strict=True) if sha]
        return self._find_digest(name, manifest_digest(files))[0]

    def _stage_version(self, pool: ThreadPoolExecutor, text: str, files: Sequence[FileEntry]) -> Path:
        """Write the version record in a staging directory, then barrier 2 (step 4): it and every
        blob name the version refers to (whoever placed them) are durable before the commit."""
        staging = self._tmp("version")
        staging.mkdir()
        (staging / "version.json").write_text(text)
        blob_dirs = {os.path.dirname(self._blobs.blob_path(f.sha256)) for f in files}
        self._blobs.barrier(pool, [staging / "version.json", staging, *blob_dirs])
        return staging

    # Step 5: commit --------------------------------------------------------------------------
    def _find_digest(self, name: str, digest: str, checked: frozenset[int] = frozenset()) -> tuple[int | None, frozenset[int]]:
        """(the version of ``name`` with ``digest``, if any, not looking at the ``checked`` ones;
        every version number looked at so far). Committed versions never change, so a caller can
        look without the lock first and, under it, only at versions committed since."""
        numbers = [n for n in self._version_numbers(name) if n not in checked]
        for n in reversed(numbers):
            if self._record_digest(name, n) == digest:
                return n, checked | set(numbers)
        return None, checked | set(numbers)

    def _record_digest(self, name: str, number: int) -> str:
        """A version's digest from the head of its record, without parsing the whole file list:
        records are written with sorted keys, so "digest" comes right after "created_at"."""
        path = self._art_dir(name) / "versions" / f"v{number}" / "version.json"
        with open(path, "rb") as f:
            m = _RECORD_DIGEST_RE.match(f.read(256))
        return m[1].decode() if m else self._read_record(name, number)["digest"]

    def _commit(self, name: str, type: str, digest: str, staging: Path, checked: frozenset[int]) -> int:
        """Under the artifact's lock: reuse a version with ``digest`` or rename ``staging`` into
        place as the next version. The ``checked`` versions are known not to have ``digest``.
        Returns the version number."""
        numbers = self._version_numbers(name)
        self._check_type(name, type, numbers)
        found, _ = self._find_digest(name, digest, checked)
        if found is not None:
            return found
        number = numbers[-1] + 1 if numbers else 0
        vdir = self._art_dir(name) / "versions"
        vdir.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                os.rename(staging, vdir / f"v{number}")  # fails if it exists: never overwrites
                break
            except OSError as e:  # a stale listing (NFS caches directories): take the next number
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                number += 1
        fsutil.fsync_path(vdir)
        return number

    def _check_type(self, name: str, type: str, numbers: Sequence[int]) -> None:
        if not numbers:
            return
        if name not in self._types:  # the first version's, which never changes
            self._types[name] = self._read_record(name, numbers[0])["type"]
        if (existing := self._types[name]) != type:
            raise ArtifactError(
                f"artifact {name!r} has type {existing!r}, cannot log type {type!r}; use another name for the new type"
            )

    def _add_aliases(self, name: str, number: int, aliases: Sequence[str]) -> None:
        """Point ``aliases`` at the committed version ``number``, under the lock."""
        if aliases:
            with file_lock(self._art_dir(name) / "lock", self.lock_timeout_s):
                self._set_aliases(name, number, aliases)

    def _set_aliases(self, name: str, number: int, aliases: Sequence[str]) -> None:
        """Point ``aliases`` at ``number`` (moving them from other versions). Caller holds the lock."""
        current = self._aliases(name)
        current.update({a: number for a in aliases})
        self._write_atomic(self._art_dir(name) / "aliases.json", json.dumps(current, indent=1))

    # ------------------------------------------------------------------------------ reading
    def _read_record(self, name: str, number: int) -> dict[str, Any]:
        path = self._art_dir(name) / "versions" / f"v{number}" / "version.json"
        return json.loads(path.read_text())

    def _to_version(self, name: str, number: int, aliases: Mapping[str, int], latest: int) -> ArtifactVersion:
        rec = self._read_record(name, number)
        p = rec["producer"]
        inputs = () if p is None else tuple(ArtifactRef.parse(r) for r in p["inputs"])
        producer = None if p is None else Producer(**{**p, "inputs": inputs})
        names = sorted(a for a, n in aliases.items() if n == number)
        return ArtifactVersion(
            ref=ArtifactRef(name, number),
            type=rec["type"],
            digest=rec["digest"],
            files=tuple(FileEntry(**f) for f in rec["files"]),
            metadata=rec["metadata"],
            aliases=tuple(([LATEST] if number == latest else []) + names),
            created_at=rec["created_at"],
            producer=producer,
        )

    def _resolve(self, ref: ArtifactRef | str) -> ArtifactRef:
        if isinstance(ref, ArtifactRef):
            name, alias = ref.name, f"v{ref.version}"
        else:
            m = REF_RE.match(ref)
            if not m:
                raise ArtifactError(f"not an artifact reference: {ref!r} (expected NAME:vN or NAME:ALIAS)")
            name, alias = m["name"], m["alias"]
        numbers = self._version_numbers(name)
        if not numbers:
            raise ArtifactNotFound(f"no artifact named {name!r} in {self.root}; artifacts: {_describe(self.names())}")
        versions = [f"v{n}" for n in numbers]
        if (m := VERSION_DIR_RE.match(alias)) and int(m[1]) in numbers:
            return ArtifactRef(name, int(m[1]))
        if alias == LATEST:
            return ArtifactRef(name, numbers[-1])
        aliases = self._aliases(name)
        if alias in aliases:
            return ArtifactRef(name, aliases[alias])
        raise ArtifactNotFound(
            f"artifact {name!r} has no version or alias {alias!r}; versions: {_describe(versions)};"
            f" aliases: {_describe([LATEST, *sorted(aliases)])}"
        )

    def get(self, ref: ArtifactRef | str) -> ArtifactVersion:
        """A version by ``ArtifactRef`` or by ``name:vN`` / ``name:latest`` / ``name:alias`` text."""
        resolved = self._resolve(ref)
        latest = self._version_numbers(resolved.name)[-1]
        return self._to_version(resolved.name, resolved.version, self._aliases(resolved.name), latest)

    def versions(self, name: str) -> list[ArtifactVersion]:
        """Every committed version of ``name``, oldest first (empty if there is none)."""
        numbers = self._version_numbers(name)
        aliases = self._aliases(name) if numbers else {}
        return [self._to_version(name, n, aliases, numbers[-1]) for n in numbers]

    def names(self) -> list[str]:
        """Every artifact name with at least one committed version, sorted."""
        entries = os.listdir(self.root / "artifacts")
        return sorted(n for n in entries if NAME_RE.match(n) and self._version_numbers(n))

    def materialize(self, ref: ArtifactRef | str) -> Path:
        """A read-only directory with the version's files at their relative paths, built once
        under ``materialized/<name>/v<N>`` (hardlinks to the blobs, or copies across devices)."""
        version = self.get(ref)
        dest = self.root / "materialized" / version.ref.name / f"v{version.ref.version}"
        if dest.is_dir():
            return dest
        build = self._tmp("materialize")
        folders: set[Path] = set()
        for f in version.files:
            target = build / f.path
            if target.parent not in folders:  # one mkdir per folder, not per file
                target.parent.mkdir(parents=True, exist_ok=True)
                folders.add(target.parent)
            self._link_or_copy(self._blob(f.sha256), target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(build, dest)
        except OSError as e:  # another process materialized it first: use theirs
            shutil.rmtree(build, ignore_errors=True)
            if not dest.is_dir():
                raise ArtifactError(f"cannot materialize {version.ref} at {dest}: {e}") from e
        return dest

    @staticmethod
    def _link_or_copy(blob: Path, target: Path) -> None:
        try:
            os.link(blob, target)
        except FileNotFoundError as e:
            if blob.exists():
                raise
            raise ArtifactError(f"blob {blob} is missing; run fsck() and log the artifact again") from e
        except OSError as e:
            if e.errno not in LINK_FALLBACK_ERRNOS:
                raise
            shutil.copyfile(blob, target)
            os.chmod(target, 0o444)

    # --------------------------------------------------------------------------- job records
    def _job_path(self, job_key: str) -> Path:
        if not JOB_KEY_RE.match(job_key):
            raise ArtifactError(
                f"invalid job key {job_key!r}: use up to 128 letters, digits and . _ - (starting with a letter or digit)"
            )
        return self.root / "jobs" / f"{job_key}.json"

    def record_job(self, job_key: str, outputs: Mapping[str, ArtifactRef]) -> None:
        """Atomically record that job ``job_key`` produced ``outputs``; every output must exist."""
        path = self._job_path(job_key)
        for ref in outputs.values():
            self._resolve(ref)  # raises ArtifactNotFound for an uncommitted output
        record = {"job_key": job_key, "outputs": {k: str(v) for k, v in sorted(outputs.items())}}
        self._write_atomic(path, json.dumps(record, indent=1))

    def job_outputs(self, job_key: str) -> dict[str, ArtifactRef] | None:
        """The outputs recorded for ``job_key``, or None if the job never completed."""
        path = self._job_path(job_key)
        if not path.exists():
            return None
        return {k: ArtifactRef.parse(v) for k, v in json.loads(path.read_text())["outputs"].items()}

    # ---------------------------------------------------------------------------------- fsck
    def fsck(self, *, temp_max_age_s: float = 3600.0) -> FsckReport:
        """Remove leftover staging entries (of dead processes on this host, or older than
        ``temp_max_age_s``), and report corrupt versions and dangling job records."""
        report = FsckReport()
        self._clean_tmp(report, temp_max_age_s)
        verified: dict[str, bool] = {}
        for name in self.names():
            for n in self._version_numbers(name):
                problem = self._check_version(name, n, verified)
                if problem:
                    report.corrupt.append(f"{name}:v{n}: {problem}")
        for path in sorted((self.root / "jobs").glob("*.json")):
            problem = self._check_job(path)
            if problem:
                report.dangling_jobs.append(f"{path.stem}: {problem}")
        return report

    def _clean_tmp(self, report: FsckReport, max_age_s: float) -> None:
        host, now = socket.gethostname(), time.time()
        for entry in sorted((self.root / "tmp").iterdir()):
            owner_host, _, pid = entry.name.rpartition("-")[0].rpartition("-")
            dead = owner_host == host and pid.isdigit() and not _pid_alive(int(pid))
            try:
                if not dead and now - entry.lstat().st_mtime <= max_age_s:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:  # its owner just committed or removed it, or NFS keeps it busy
                continue
            report.removed_temp.append(entry.name)

    def _check_version(self, name: str, number: int, verified: dict[str, bool]) -> str | None:
        try:
            version = self.get(ArtifactRef(name, number))
        except (OSError, ValueError, KeyError, ArtifactError) as e:
            return f"unreadable version record ({e})"
        if manifest_digest(version.files) != version.digest:
            return "digest does not match the manifest"
        for f in version.files:
            blob = self._blob(f.sha256)
            if f.sha256 not in verified:
                verified[f.sha256] = blob.is_file() and sha256_file(blob) == f.sha256
            if not verified[f.sha256]:
                return f"blob of {f.path} is missing or corrupt ({blob})"
        return None

    def _check_job(self, path: Path) -> str | None:
        try:
            outputs = self.job_outputs(path.stem) or {}
        except (OSError, ValueError, KeyError, ArtifactError) as e:
            return f"unreadable job record ({e})"
        missing = [str(r) for r in outputs.values() if r.version not in self._version_numbers(r.name)]
        return f"outputs missing: {', '.join(missing)}" if missing else None
