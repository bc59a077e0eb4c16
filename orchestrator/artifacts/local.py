"""The local directory artifact store: content-addressed blobs, atomically committed versions.

Layout under the store root::

    objects/ab/cdef...                  file blobs, named by sha256, read-only, written once
    artifacts/<name>/versions/v<N>/version.json   one committed version (immutable)
    artifacts/<name>/aliases.json       {"alias": N} for custom aliases (``latest`` is implicit)
    artifacts/<name>/lock               lock file: version allocation and alias updates
    jobs/<job_key>.json                 the outputs a job committed
    materialized/<name>/v<N>/...        read-only hardlinked view of a version's files
    tmp/<host>-<pid>-<uuid>.<kind>      staging; anything left here after a crash is garbage

A version becomes visible by a single ``rename`` of a complete, fsynced staging directory, after every
blob it references is in place, so readers never see a half-written version, even after SIGKILL.
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
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from .locking import file_lock

CHUNK = 1 << 20
IO_THREADS = min(8, 2 * (os.cpu_count() or 1))  # hashing and copying files side by side
LATEST = "latest"
VERSION_DIR_RE = re.compile(r"^v(\d+)$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+\-]{0,127}$")
JOB_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
LINK_FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES}


@dataclass
class FsckReport:
    """What ``LocalStore.fsck`` found; only ``removed_temp`` was acted on."""

    removed_temp: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # "name:vN: reason"
    dangling_jobs: list[str] = field(default_factory=list)  # "job_key: reason"

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.dangling_jobs


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    try:
        return json.dumps(value, sort_keys=True, indent=1)
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


def _list_source(source: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, file) for every file under ``source``, following file symlinks."""
    source = Path(source)
    if not source.is_dir():
        raise ArtifactError(f"cannot log {source}: it is not a directory (log a directory of files)")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(source):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise ArtifactError(
                    f"cannot log {source}: {os.path.join(dirpath, d)} is a symlinked directory;"
                    " copy its files into the source directory instead"
                )
        for fname in filenames:
            p = Path(dirpath, fname)
            if not p.is_file():
                raise ArtifactError(f"cannot log {p}: not a regular file (broken symlink?)")
            found.append((p.relative_to(source).as_posix(), p))
    if not found:
        raise ArtifactError(f"cannot log {source}: the directory holds no files")
    return sorted(found)


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

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ----------------------------------------------------------------- paths and small helpers
    def _blob(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / sha[2:]

    def _art_dir(self, name: str) -> Path:
        return self.root / "artifacts" / check_name(name)

    def _tmp(self, kind: str) -> Path:
        return self.root / "tmp" / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}.{kind}"

    def _write_atomic(self, dest: Path, text: str) -> None:
        tmp = self._tmp("file")
        _write_synced(tmp, text)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)

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
    ) -> ArtifactVersion:
        """Commit the files under ``source`` as version ``name:vN`` (N = 1 + the newest), or return
        the existing version with the same content digest (then ``metadata`` and ``producer`` are
        ignored and only ``aliases`` are added). ``latest`` always names the newest version."""
        self._check_type(name, type, self._version_numbers(name))  # checked again under the lock
        new_aliases = [self._check_alias(a) for a in aliases if a != LATEST]
        sources = _list_source(source)
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:  # hashlib and file I/O release the GIL
            digests = list(pool.map(self._hashes.sha256, [p for _, p in sources]))
        files = [FileEntry(rel, sha, p.stat().st_size) for (rel, p), sha in zip(sources, digests, strict=True)]
        record = {
            "type": type,
            "digest": manifest_digest(files),
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files],
            "metadata": dict(metadata or {}),
            "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "producer": self._producer_to_dict(producer),
        }
        text = _to_json(record, f"metadata/provenance of artifact {name!r}")
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:  # every blob is in place before the commit
            list(pool.map(self._store_blob, [p for _, p in sources], [f.sha256 for f in files]))
        staging = self._stage_version(text)
        try:
            with file_lock(self._art_dir(name) / "lock", self.lock_timeout_s):
                number = self._commit(name, type, record["digest"], staging)
                if new_aliases:
                    self._set_aliases(name, number, new_aliases)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already unless deduplicated/failed
        return self.get(ArtifactRef(name, number))

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

    def _store_blob(self, src: Path, sha: str) -> None:
        """Copy ``src`` to its content address unless a blob with that digest already exists."""
        dest = self._blob(sha)
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp("blob")
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        if h.hexdigest() != sha:
            tmp.unlink()
            raise ArtifactError(f"{src} changed while it was being logged; log it again once stable")
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)

    def _stage_version(self, text: str) -> Path:
        staging = self._tmp("version")
        staging.mkdir()
        _write_synced(staging / "version.json", text)
        _fsync_dir(staging)
        return staging

    def _commit(self, name: str, type: str, digest: str, staging: Path) -> int:
        """Under the artifact's lock: reuse a version with ``digest`` or rename ``staging`` into
        place as the next version. Returns the version number."""
        numbers = self._version_numbers(name)
        self._check_type(name, type, numbers)
        for n in reversed(numbers):
            if self._read_record(name, n)["digest"] == digest:
                return n
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
        _fsync_dir(vdir)
        return number

    def _check_type(self, name: str, type: str, numbers: Sequence[int]) -> None:
        if numbers and (existing := self._read_record(name, numbers[0])["type"]) != type:
            raise ArtifactError(
                f"artifact {name!r} has type {existing!r}, cannot log type {type!r}; use another name for the new type"
            )

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
        for f in version.files:
            target = build / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
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
        if not blob.exists():
            raise ArtifactError(f"blob {blob} is missing; run fsck() and log the artifact again")
        try:
            os.link(blob, target)
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
