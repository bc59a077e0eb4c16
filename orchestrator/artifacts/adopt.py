"""Adopting versions and job records made by another store (``pull``): same numbers, same records.

``LocalStore.log`` numbers a new version itself (one more than any before). A version pulled from
another store must keep its number instead, because job records and producers name versions by
number (``name:vN``). ``adopt`` commits the files of ``source`` as exactly version ``ref`` with
exactly ``record`` (its ``version.json`` as the other store wrote it: type, digest, files,
metadata, created_at, producer), through the store's own machinery and commit order (see
``local.py``'s docstring):

1. Ingest (``BlobWriter.ingest_all``): each file hashed once while copied to ``tmp/`` (or taken,
   ``move=True``); then every file must be the one the record lists, path, sha256 and size, and
   nothing else: any difference raises ``CorruptArtifact`` before anything is placed.
2. Barrier 1, place the blobs into ``objects/``, make every blob intact (``ensure``).
3. Stage ``version.json`` and barrier 2.
4. Under the artifact's lock: ``versions/vN`` must still be free (not taken, not retired by fsck),
   then one ``rename`` of the staging folder commits it, and ``versions/`` is fsynced.

A crash (SIGKILL, power loss) at any point leaves only garbage in ``tmp/`` (``fsck`` removes it)
and complete, unreferenced blobs: never a half-written version. A present ``vN`` with the same
digest is left as it is (its missing or corrupt blobs restored from ``source``, as a re-log does);
one with another digest, a damaged one or a retired number is refused (``AdoptConflict``), nothing
written. ``adopt_job`` writes a job record exactly as given once every version it names exists.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import fsutil
from .base import ArtifactError, ArtifactRef, CorruptArtifact, DamagedRecord, FileEntry
from .ingest import Ingested, discard, list_source
from .locking import file_lock
from .pool import IO_THREADS
from .records import JOB_CONSEQUENCE, VersionRecord, manifest_digest, parse_job, parse_version, read_json

if TYPE_CHECKING:
    from .local import LocalStore

__all__ = ["AdoptConflict", "adopt", "adopt_job", "job_conflict", "parse_record", "present"]


class AdoptConflict(ArtifactError):
    """The store holds something else under the number (or job key) being adopted."""


def _canonical(value: Mapping[str, Any]) -> str:
    """A record as the store writes it: compact, sorted keys (``_record_digest`` reads its head)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def parse_record(ref: ArtifactRef, record: Mapping[str, Any]) -> VersionRecord:
    """``record`` checked as a version record whose digest matches its file list, or ArtifactError."""
    try:
        parsed = parse_version(Path(f"record of {ref}"), dict(record))
    except DamagedRecord as e:
        raise ArtifactError(f"cannot adopt {ref}: its record is invalid: {e.problem}") from None
    if manifest_digest(parsed.files) != parsed.digest:
        raise ArtifactError(f"cannot adopt {ref}: its digest does not match its file list")
    return parsed


def present(store: LocalStore, ref: ArtifactRef, digest: str) -> bool:
    """Whether ``store`` has ``ref`` with ``digest``, sound. AdoptConflict if the number holds another
    version, a damaged one, or was retired (a number never names two contents)."""
    numbers = store._version_numbers(ref.name)
    if ref.version not in numbers:
        if (store._art_dir(ref.name) / "versions" / f"v{ref.version}.retired").exists():
            raise AdoptConflict(
                f"{ref} was retired by fsck --repair in {store.root}; its number is never reused: pull into another store"
            )
        return False
    if store._record_digest(ref.name, ref.version) == digest and store._sound(ref.name, ref.version, digest):
        return True
    theirs = store._record_digest(ref.name, ref.version)
    what = f"digest {theirs[:12]}" if theirs else "a damaged record"
    raise AdoptConflict(
        f"{store.root} already has {ref} with {what}, not {digest[:12]}: another version under the same number;"
        " nothing was overwritten (pull into an empty --store, or run `orchestrator fsck --repair` if it is damaged)"
    )


def adopt(store: LocalStore, ref: ArtifactRef, record: Mapping[str, Any], source: Path, *, move: bool = False) -> bool:
    """Commit the files under ``source`` as version ``ref`` of ``store`` with exactly ``record``.
    True if committed, False if ``ref`` was present with the same digest (its blobs then made
    intact from ``source``). CorruptArtifact if the files are not the record's (nothing placed),
    AdoptConflict if the number is taken by other content (nothing written). ``move``: as for
    ``LocalStore.log``, files the store can take are renamed into it."""
    parsed = parse_record(ref, record)
    text = _canonical(record)
    exists = present(store, ref, parsed.digest)
    if not exists:
        store._check_type(ref.name, parsed.type, store._version_numbers(ref.name))
    sources = list_source(source)
    try:
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            items = store._blobs.ingest_all(pool, sources, move)
            try:
                _check_files(ref, parsed.files, items)
                if exists:
                    store._blobs.ensure(pool, items)
                    return False
                store._blobs.place_all(pool, items)
                store._blobs.ensure(pool, items)
                staging = store._stage_version(pool, text, parsed.files)
            finally:
                discard(items)
        try:
            return _commit(store, ref, parsed, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # renamed away unless refused
    finally:
        store._hashes.flush()


def _check_files(ref: ArtifactRef, files: Sequence[FileEntry], items: Sequence[Ingested]) -> None:
    """Every ingested file is the one the record lists (path, sha256, size), and none is missing."""
    expected = {f.path: f for f in files}
    got = {i.rel: i for i in items}
    for rel, item in got.items():
        want = expected.get(rel)
        if want is None:
            raise CorruptArtifact(f"{ref}: file {rel!r} is not in its record; nothing was stored")
        if (item.sha, item.size) != (want.sha256, want.size):
            raise CorruptArtifact(
                f"{ref}: file {rel!r} has sha256 {item.sha[:12]} and {item.size} bytes, its record says"
                f" {want.sha256[:12]} and {want.size} bytes; nothing was stored"
            )
    missing = sorted(set(expected) - set(got))
    if missing:
        raise CorruptArtifact(f"{ref}: files missing: {', '.join(missing[:5])}; nothing was stored")


def _commit(store: LocalStore, ref: ArtifactRef, parsed: VersionRecord, staging: Path) -> bool:
    """Step 4: rename ``staging`` to ``versions/vN`` under the lock, unless vN appeared meanwhile
    (same digest: False; other content: AdoptConflict)."""
    vdir = store._art_dir(ref.name) / "versions"
    with file_lock(store._art_dir(ref.name) / "lock", store.lock_timeout_s):
        if present(store, ref, parsed.digest):
            return False
        store._check_type(ref.name, parsed.type, store._version_numbers(ref.name))
        vdir.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, vdir / f"v{ref.version}")  # fails if it exists: never overwrites
        except OSError as e:
            if not (vdir / f"v{ref.version}").exists():
                raise
            raise AdoptConflict(f"{ref} appeared in {store.root} while it was being adopted; pull again") from e
        fsutil.fsync_path(vdir)  # the commit point
    return True


def adopt_job(store: LocalStore, job_key: str, record: Mapping[str, Any]) -> bool:
    """Write job record ``job_key`` exactly as ``record`` (another store's ``jobs/<key>.json``),
    atomically, once every version it names exists. True if written, False if the store has the
    same record already (same outputs and inputs); AdoptConflict if it has another one."""
    path = store._job_path(job_key)
    try:
        commit = parse_job(path, dict(record), job_key)
    except DamagedRecord as e:
        raise ArtifactError(f"cannot adopt the record of job {job_key}: {e.problem}") from None
    if job_conflict(store, job_key, record) == "same":
        return False
    for ref in [*commit.outputs.values(), *(r for refs in (commit.inputs or {}).values() for r in refs)]:
        store._resolve(ref)  # ArtifactNotFound for a version not committed (yet)
    store._write_atomic(path, json.dumps(dict(record), indent=1))
    return True


def job_conflict(store: LocalStore, job_key: str, record: Mapping[str, Any]) -> str | None:
    """None if ``store`` has no record of ``job_key``; "same" if it has one with the same outputs
    and inputs as ``record``; AdoptConflict if it has another (or an unreadable one)."""
    path = store._job_path(job_key)
    try:
        mine = read_json(path, JOB_CONSEQUENCE)
    except FileNotFoundError:
        return None
    except DamagedRecord as e:
        raise AdoptConflict(f"{e}") from None
    if isinstance(mine, dict) and (mine.get("outputs"), mine.get("inputs")) == (record.get("outputs"), record.get("inputs")):
        return "same"
    raise AdoptConflict(
        f"{path} records other outputs or inputs for job {job_key}; nothing was overwritten"
        " (pull into an empty --store, or move that record away if it is wrong)"
    )

