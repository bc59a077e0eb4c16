"""The local directory artifact store: content-addressed blobs, atomically committed versions.

Layout under the store root::

    objects/ab/cdef...                  file blobs, named by sha256, read-only, written once
    artifacts/<name>/versions/v<N>/version.json   one committed version (immutable)
    artifacts/<name>/versions/v<N>.retired        a number fsck --repair retired: never used again
    artifacts/<name>/aliases.json       {"alias": N} for custom aliases (``latest`` is implicit)
    artifacts/<name>/lock               lock file: version allocation and alias updates
    jobs/<job_key>.json                 the outputs a job committed, and the input versions it used
    materialized/<name>/v<N>/...        read-only verified copies of a version's files (views.py),
    materialized/<name>/v<N>.verified.json    with the stamps they had when verified
    cache/hashes.jsonl                  remembered digests of source files and blobs (hashcache.py)
    quarantine/...                      whatever was found damaged, moved aside (quarantine.py)
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
3. Place: rename each into ``objects/`` unless a blob of that digest exists already, and remember
   the placed blob's stamp. Then every blob the version names must be intact (see below).
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
Steps 1-3 are ``ingest.BlobWriter``'s; this module keeps the versions, aliases, reads and records.

The invariant above holds against crashes, not against bit rot, a stage running as root, or a
person with ``rm``. So committed bytes are checked, not assumed, and the store repairs itself:

- Consumers read copies, verified. ``materialize`` copies (or reflinks) each blob into the version's
  view, hashing the bytes it writes; a blob that does not match is moved to ``quarantine/`` and
  ``CorruptArtifact`` raised, so no job computes from bytes its lineage does not name, and no stage
  can reach a committed blob through its inputs. A view is verified once, then checked by stamps
  (views.py).
- A blob counts as intact when its stamp is the one remembered when the store placed or verified
  it (one stat: blobs are written by the store alone, read-only), else when its bytes hash to its
  name (read once, then remembered). Moving a corrupt blob to quarantine checks its inode first,
  so a blob that another process has just repaired is never the one moved.
- Whenever ``log`` returns an existing version (same digest), it first makes every blob of that
  version intact, replacing a missing or corrupt one from the source being logged, which holds
  exactly those bytes; a new version's blobs shared with stored ones likewise. Rerunning the
  producer (``submit --force``) thus repairs its outputs in place, under the same version numbers.
  A replacement follows steps 2-4: its bytes are durable before its name, its name before
  ``log`` returns (and so before any job record can rely on it).
- Records are read through ``records``: a damaged one raises ``DamagedRecord`` (one line: the file,
  what is wrong, what to do), never a traceback. Digest matching and the type check skip damaged
  versions, so logging a name goes on; a new version takes the number after every existing or
  retired one, so a number never names two contents. A damaged alias file is quarantined by the
  next alias update.
- A job record counts as committed (``job_problem`` is None) only while every output version it
  names exists with all its blobs present. ``fsck(repair=True)`` quarantines what is damaged and
  drops the job records that relied on it, transitively (fsck.py).

This module is the writing side; reading versions and job records is ``reading.py``
(``StoreReader``), alias updates ``aliases.py`` (``AliasWriter``), both bases of ``LocalStore``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import fsutil
from .aliases import AliasWriter
from .base import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactVersion,
    DamagedRecord,
    FileEntry,
    Producer,
)
from .describe import producer_dict
from .fsck import Fsck, FsckReport
from .hashcache import HashCache
from .ingest import BlobWriter, Ingested, discard, list_source
from .locking import file_lock
from .pool import IO_THREADS
from .quarantine import quarantine
from .reading import LATEST
from .records import (
    VersionRecord,
    manifest_digest,
)
from .views import Views

__all__ = ["FsckReport", "LocalStore", "manifest_digest"]

RETIRED_RE = re.compile(r"^v(\d+)\.retired\Z")
# The head of a version record, in the compact format and in the indented one of older stores.
_RECORD_DIGEST_RE = re.compile(rb'\{\s*"created_at":\s*"[^"]*",\s*"digest":\s*"([0-9a-f]{64})"')


def _write_synced(path: Path, text: str) -> None:
    with open(path, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _to_json(value: Any, what: str) -> str:
    """Compact JSON: with ``indent``, json falls back from its C encoder to pure Python, 5x slower
    (30 ms for the record of 2,000 files)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{what} is not JSON-serialisable ({e}); use str, int, float, bool, None, lists and dicts") from e


class LocalStore(AliasWriter):
    """An artifact store in a directory, safe for concurrent processes (also on NFS).

    ``create=False`` opens an existing store only: a missing one raises ArtifactNotFound instead of
    being created (what a check such as fsck wants)."""

    def __init__(self, root: Path | str, *, lock_timeout_s: float | None = 600.0, create: bool = True) -> None:
        self.root = Path(root).resolve()
        if not create and not all((self.root / sub).is_dir() for sub in ("objects", "artifacts")):
            raise ArtifactNotFound(
                f"no artifact store at {self.root}: it does not exist (no objects/ and artifacts/ folders there); check the path"
            )
        self.lock_timeout_s = lock_timeout_s
        self._hashes = HashCache(self.root / "cache" / "hashes.jsonl")
        for sub in ("objects", "artifacts", "jobs", "materialized", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._blobs = BlobWriter(self.root, self._hashes)
        self._views = Views(self.root, self._blobs, self._hashes, lock_timeout_s, self._write_atomic, self._check_digest)
        self._types: dict[str, str] = {}  # artifact name -> type of its first readable version
        self._records: dict[Path, tuple[tuple[int, ...], VersionRecord]] = {}  # see _read_record

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ----------------------------------------------------------------- paths and small helpers

    def _tmp(self, kind: str) -> Path:
        return Path(self._blobs.tmp_path(kind))

    def _write_atomic(self, dest: Path, text: str) -> None:
        tmp = self._tmp("file")
        _write_synced(tmp, text)
        os.replace(tmp, dest)
        fsutil.fsync_path(dest.parent)

    def _next_number(self, name: str, numbers: Sequence[int]) -> int:
        """One more than every version number of ``name`` that exists or was retired."""
        vdir = self._art_dir(name) / "versions"
        retired = [int(m[1]) for e in os.listdir(vdir) if (m := RETIRED_RE.match(e))] if vdir.is_dir() else []
        return max([*numbers, *retired], default=-1) + 1

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
        ignored and only ``aliases`` are added, and any of its blobs found missing or corrupt is
        restored from ``source``). ``latest`` always names the newest version.

        ``move=True`` hands the files over to the store: each one it can take (a regular file on
        the store's filesystem with no other hard link) is renamed into the store instead of
        copied, and made read-only first. Use it for a directory that is discarded afterwards,
        such as a job's staging output, and write nothing to it once ``log`` has begun. Files that
        cannot be taken (symlinks, hard-linked files, another filesystem) and files whose content
        is already stored are copied or skipped and left where they are. If the log fails, some
        files may be in the store already and gone from ``source``: recreate it to log again."""
        self._check_type(name, type, self._version_numbers(name))  # checked again under the lock
        new_aliases = [self._check_alias(a) for a in aliases if a != LATEST]
        record = {"type": type, "metadata": dict(metadata or {}), "producer": producer_dict(producer)}
        _to_json(record, f"metadata/provenance of artifact {name!r}")  # fail before touching any file
        sources = list_source(source)
        try:
            unchanged = self._unchanged_version(name, sources)
            if unchanged is not None:  # an identical re-log, told from the listing alone
                number, items = unchanged
                self._blobs.ensure(None, items)  # one stat per blob, unless one needs repair
                self._add_aliases(name, number, new_aliases)
            else:
                number = self._ingest_and_commit(name, record, sources, move, new_aliases)
        finally:
            self._hashes.flush()  # the digests read and the blob stamps placed or verified, even if it failed
        return self._logged(name, number)

    def _ingest_and_commit(
        self,
        name: str,
        record: dict[str, Any],
        sources: Sequence[tuple[str, str, os.stat_result]],
        move: bool,
        aliases: Sequence[str],
    ) -> int:
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            items = self._blobs.ingest_all(pool, sources, move)
            try:
                files = [FileEntry(i.rel, i.sha, i.size) for i in items]
                return self._commit_files(pool, name, record, files, items, aliases)
            finally:
                discard(items)  # left over if deduplicated or failed

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
        (then its blobs are made intact and only ``aliases`` are set on it). ``record`` holds type,
        metadata and producer."""
        digest = manifest_digest(files)
        number, checked = self._find_digest(name, digest)
        if number is not None:  # identical content: nothing to write, unless a blob was lost
            self._blobs.ensure(pool, items)
            self._add_aliases(name, number, aliases)
            return number
        self._blobs.place_all(pool, items)
        self._blobs.ensure(pool, items)  # the blobs this version shares with stored ones, too
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

    def _unchanged_version(
        self, name: str, sources: Sequence[tuple[str, str, os.stat_result]]
    ) -> tuple[int, list[Ingested]] | None:
        """The version of ``name`` with exactly these files, if every file's digest is remembered
        (then no file is read), with the files as items to check its blobs against."""
        shas = [self._hashes.known(st) for _, _, st in sources]
        if any(sha is None for sha in shas):
            return None
        items = [Ingested(rel, src, sha, st.st_size) for (rel, src, st), sha in zip(sources, shas, strict=True) if sha]
        number = self._find_digest(name, manifest_digest([FileEntry(i.rel, i.sha, i.size) for i in items]))[0]
        return None if number is None else (number, items)

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
        """(the version of ``name`` with ``digest`` and a sound record, if any, not looking at the
        ``checked`` ones; every version number looked at so far). Committed versions never change,
        so a caller can look without the lock first and, under it, only at versions committed since.
        Damaged versions are passed over: their content gets logged as a new version."""
        numbers = [n for n in self._version_numbers(name) if n not in checked]
        for n in reversed(numbers):
            if self._record_digest(name, n) == digest and self._sound(name, n, digest):
                return n, checked | set(numbers)
        return None, checked | set(numbers)

    def _record_digest(self, name: str, number: int) -> str | None:
        """A version's digest from the head of its record, without parsing the whole file list:
        records are written with sorted keys, so "digest" comes right after "created_at". None if
        the record is damaged."""
        try:
            with open(self._record_path(name, number), "rb") as f:
                m = _RECORD_DIGEST_RE.match(f.read(256))
            return m[1].decode() if m else self._read_record(name, number).digest
        except (OSError, DamagedRecord):
            return None

    def _sound(self, name: str, number: int, digest: str) -> bool:
        """Whether version ``number``'s whole record is valid and its file list has ``digest``
        (the head alone could survive a truncation)."""
        try:
            record = self._read_record(name, number)
        except DamagedRecord:
            return False
        return record.digest == digest and manifest_digest(record.files) == digest

    def _commit(self, name: str, type: str, digest: str, staging: Path, checked: frozenset[int]) -> int:
        """Under the artifact's lock: reuse a version with ``digest`` or rename ``staging`` into
        place as the next version. The ``checked`` versions are known not to have ``digest``.
        Returns the version number."""
        numbers = self._version_numbers(name)
        self._check_type(name, type, numbers)
        found, _ = self._find_digest(name, digest, checked)
        if found is not None:
            return found
        number = self._next_number(name, numbers)
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
        if name not in self._types:  # the first readable version's, which never changes
            first = next((t for t in (self._type_of(name, n) for n in numbers) if t is not None), None)
            if first is None:  # every version is damaged: nothing to compare with
                return
            self._types[name] = first
        if (existing := self._types[name]) != type:
            raise ArtifactError(
                f"artifact {name!r} has type {existing!r}, cannot log type {type!r}; use another name for the new type"
            )

    # ------------------------------------------------------------------------------ reading
    def _logged(self, name: str, number: int) -> ArtifactVersion:
        """What ``log`` returns: version ``number`` with its aliases, healing a damaged alias file
        (so that logging a name never stays blocked by it)."""
        try:
            aliases = self._aliases(name)
        except DamagedRecord:
            with file_lock(self._art_dir(name) / "lock", self.lock_timeout_s):
                aliases = self._healed_aliases(name)
        return self._to_version(name, number, aliases, self._version_numbers(name)[-1])

    def materialize(self, ref: ArtifactRef | str) -> Path:
        """A read-only directory with the version's files at their relative paths, under
        ``materialized/<name>/v<N>``: copies of the blobs (reflinks where the filesystem has them),
        verified against their digests when copied and by their stamps afterwards. Raises
        CorruptArtifact (naming the file and the remedy) rather than hand out other bytes."""
        return self._views.materialize(self._content(ref))

    def modified_view_files(self, ref: ArtifactRef | str) -> list[str]:
        """The relative paths in ``materialize(ref)``'s directory that were written to, added or
        removed since it was verified: call it after a stage ran to catch one that wrote to its
        inputs. The next ``materialize`` puts them right."""
        return self._views.modified(self._content(ref))

    # --------------------------------------------------------------------------- job records

    def record_job(
        self,
        job_key: str,
        outputs: Mapping[str, ArtifactRef],
        inputs: Mapping[str, Sequence[ArtifactRef]] | None = None,
    ) -> None:
        """Atomically record that job ``job_key`` produced ``outputs`` from ``inputs`` (each input
        binding's versions, in the order consumed); every version named must exist."""
        path = self._job_path(job_key)
        for ref in [*outputs.values(), *(r for refs in (inputs or {}).values() for r in refs)]:
            self._resolve(ref)  # raises ArtifactNotFound for an uncommitted version
        record: dict[str, Any] = {"job_key": job_key, "outputs": {k: str(v) for k, v in sorted(outputs.items())}}
        if inputs is not None:
            record["inputs"] = {k: [str(r) for r in refs] for k, refs in sorted(inputs.items())}
        record["recorded_at"] = datetime.now(UTC).isoformat(timespec="microseconds")
        self._write_atomic(path, json.dumps(record, indent=1))

    def drop_job(self, job_key: str) -> None:
        """Forget ``job_key``'s record (moved to quarantine, not deleted), so that it runs again."""
        quarantine(self.root, self._job_path(job_key))

    # ---------------------------------------------------------------------------------- fsck
    def fsck(self, repair: bool = False, *, temp_max_age_s: float = 3600.0) -> FsckReport:
        """Remove leftover staging entries (of dead processes on this host, or older than
        ``temp_max_age_s``), and report corrupt versions, damaged records and job records that
        are not (or no longer) backed by intact versions. ``repair``: put them right (fsck.py)."""
        return Fsck(self, repair).run(temp_max_age_s)
