"""Materialized views: ``materialized/<name>/v<N>/``, the folder every consumer reads a version
through, holding exactly the bytes its manifest names.

- Copies, never links: each file is a reflink of its blob where the filesystem has them (btrfs,
  XFS: copy-on-write, no data written) or else a plain copy, made read-only. A stage that writes
  to its input anyway (0444 does not stop root) changes its copy, never the committed blob.
- Verified while built: the bytes written are hashed and compared with the manifest; a blob whose
  bytes differ is moved to ``quarantine/`` (from then on it is missing, which a re-log of the same
  files repairs) and ``CorruptArtifact`` names the version, the file and the remedy.
- Verified once: the sidecar ``v<N>.verified.json`` records each file's and folder's stamp (device,
  inode, size, mtime and ctime in ns) once the view is built and durable. A later call stats each
  file and folder and returns at once if every stamp matches; a write, chmod, new or removed entry
  moves a stamp, and only the files concerned are copied again from their (verified) blobs, each
  to a temporary file renamed over the old one, so readers never find the folder missing. Extra
  entries are removed and folders replaced by links are rebuilt. A missing or damaged sidecar, or
  one of another digest, means verifying every file again.
- One builder at a time: building and repairing happen under ``v<N>.lock`` (checked again once
  held), so many jobs starting on the same new input copy it once; the fast path takes no lock.
- ``modified`` compares with the stamps this process was handed: if another job's ``materialize``
  repaired a file after this job's stage may have read the damaged one, it is still reported.
- The sidecar is written after one durability barrier over the view, so after a power loss it
  never vouches for a file whose bytes did not reach the disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import ArtifactError, ArtifactVersion, CorruptArtifact, FileEntry
from .hashcache import HashCache
from .ingest import BlobWriter, copy_and_hash, same_content_stamp
from .locking import file_lock
from .pool import IO_THREADS, batches, map_all

FICLONE = getattr(fcntl, "FICLONE", 0x40049409)  # ioctl(dst, FICLONE, src): share src's extents
# errnos by which a filesystem (not one file) says it cannot clone: not tried there again
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV}
Stamp = tuple[int, int, int, int, int]


def stamp_of(path: str) -> Stamp | None:
    """(device, inode, size, mtime ns, ctime ns) of ``path`` itself (not a link's target); None if
    it cannot be stat'ed. Any write, chmod, rename into place or new entry (folders) moves it."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _join(folder: str, rel: str) -> str:
    return f"{folder}/{rel}" if rel else folder


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class Layout:
    """Where a version's files go: each file, each folder ("" is the view; parents first), and the
    entry names each folder may hold."""

    files: dict[str, FileEntry]
    dirs: list[str]
    children: dict[str, set[str]]

    @classmethod
    def of(cls, files: Iterable[FileEntry]) -> Layout:
        by_path = {f.path: f for f in files}
        children: dict[str, set[str]] = {"": set()}
        for path in by_path:
            parts = path.split("/")
            for k in range(len(parts)):
                children.setdefault("/".join(parts[:k]), set()).add(parts[k])
        dirs = sorted(children, key=lambda d: (d.count("/") + 1 if d else 0, d))
        return cls(by_path, dirs, children)


@dataclass(frozen=True)
class Sidecar:
    files: dict[str, Stamp]
    dirs: dict[str, Stamp]


def _stamps(value: Any) -> dict[str, Stamp] | None:
    if not isinstance(value, dict):
        return None
    out = {k: tuple(v) for k, v in value.items() if isinstance(v, list) and len(v) == 5}
    return out if len(out) == len(value) else None


def _known(stamps: dict[str, Stamp | None]) -> dict[str, Stamp]:
    return {k: v for k, v in stamps.items() if v is not None}


def read_sidecar(path: Path, version: ArtifactVersion) -> Sidecar | None:
    """The stamps recorded when ``version``'s view was verified; None if missing, unreadable or
    written for other content (a version number that once named other bytes)."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict) or value.get("ref") != str(version.ref) or value.get("digest") != version.digest:
        return None
    files, dirs = _stamps(value.get("files")), _stamps(value.get("dirs"))
    return None if files is None or dirs is None else Sidecar(files, dirs)


@dataclass(frozen=True)
class Stale:
    """What in a view no longer matches its sidecar."""

    files: list[str]
    dirs: list[str]

    def __bool__(self) -> bool:
        return bool(self.files or self.dirs)


def find_stale(dest: str, layout: Layout, sidecar: Sidecar | None) -> Stale:
    """Every file and folder of ``dest`` whose stamp differs from ``sidecar`` (all without one):
    one lstat each, no reads."""
    if sidecar is None:
        return Stale(list(layout.files), list(layout.dirs))
    files = [rel for rel in layout.files if stamp_of(f"{dest}/{rel}") != sidecar.files.get(rel)]
    dirs = [d for d in layout.dirs if stamp_of(_join(dest, d)) != sidecar.dirs.get(d)]
    return Stale(files, dirs)


@dataclass(frozen=True)
class Copied:
    """One file copied from its blob: whether its bytes matched, and if not, the blob's stat when
    read (None: the blob is missing)."""

    entry: FileEntry
    ok: bool
    blob: os.stat_result | None


class Views:
    """Builds, verifies and repairs the views of one store (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        blobs: BlobWriter,
        hashes: HashCache,
        lock_timeout_s: float | None,
        write_atomic: Callable[[Path, str], None],
        check_digest: Callable[[ArtifactVersion], None],
    ) -> None:
        self.folder = root / "materialized"
        self._blobs, self._hashes, self._lock_timeout_s = blobs, hashes, lock_timeout_s
        self._write_atomic, self._check_digest = write_atomic, check_digest
        self._no_reflink: set[int] = set()  # devices whose filesystem cannot clone
        self._handed: dict[tuple[str, int], Sidecar] = {}  # the stamps of each view as this process got it

    def paths(self, name: str, number: int) -> tuple[Path, Path, Path]:
        """(the view, its sidecar, its lock file)."""
        folder = self.folder / name
        return folder / f"v{number}", folder / f"v{number}.verified.json", folder / f"v{number}.lock"

    # ------------------------------------------------------------------------------- public
    def materialize(self, version: ArtifactVersion) -> Path:
        dest, sidecar, lock = self.paths(version.ref.name, version.ref.version)
        layout = Layout.of(version.files)
        stamps = read_sidecar(sidecar, version)
        if not (_is_dir(str(dest)) and stamps is not None and not find_stale(str(dest), layout, stamps)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(lock, self._lock_timeout_s):
                stamps = self._make_current(version, layout, dest, sidecar)
        # (else: verified before, and nothing changed since: no reads)
        self._handed[(version.ref.name, version.ref.version)] = stamps
        return dest

    def modified(self, version: ArtifactVersion) -> list[str]:
        """View paths written to, added or removed since the view was verified (see find_stale)."""
        dest, sidecar, _ = self.paths(version.ref.name, version.ref.version)
        layout = Layout.of(version.files)
        if not os.path.lexists(dest):
            return []
        if not _is_dir(str(dest)):
            return sorted(layout.files)
        handed = self._handed.get((version.ref.name, version.ref.version))
        stale = find_stale(str(dest), layout, handed or read_sidecar(sidecar, version))
        changed = set(stale.files)
        for d in stale.dirs:
            changed.update(f"{d}/{name}" if d else name for name in self._extras(str(dest), d, layout))
        return sorted(changed)

    def forget(self, name: str, number: int) -> None:
        """Remove the view and sidecar of a version that was moved to quarantine."""
        dest, sidecar, _ = self.paths(name, number)
        self._set_aside(str(dest))
        sidecar.unlink(missing_ok=True)

    # ----------------------------------------------------------------------- build and repair
    def _make_current(self, version: ArtifactVersion, layout: Layout, dest: Path, sidecar: Path) -> Sidecar:
        """Under the view's lock: build the view or repair what changed in it, then seal it; the
        stamps it has now."""
        if _is_dir(str(dest)):
            stamps = read_sidecar(sidecar, version)
            if stamps is not None and not find_stale(str(dest), layout, stamps):
                return stamps  # another process made it current while this one waited for the lock
            self._check_digest(version)
            self._repair(version, layout, str(dest), stamps)
        else:
            self._check_digest(version)
            self._set_aside(str(dest))  # a file or link where the folder belongs
            if not self._build(version, layout, dest):  # lost a race with a writer that takes no lock
                self._repair(version, layout, str(dest), None)
        return self._seal(version, layout, str(dest), sidecar)

    def _build(self, version: ArtifactVersion, layout: Layout, dest: Path) -> bool:
        """Build the whole view in ``tmp/`` and rename it into place; False if ``dest`` appeared."""
        build = self._blobs.tmp_path("view")
        os.mkdir(build)
        try:
            for d in layout.dirs[1:]:
                os.mkdir(f"{build}/{d}")
            self._copy_all(version, [(f, f"{build}/{f.path}") for f in layout.files.values()])
            try:
                os.rename(build, dest)
            except OSError as e:
                if not _is_dir(str(dest)):
                    raise ArtifactError(f"cannot materialize {version.ref} at {dest}: {e}") from e
                return False
            return True
        finally:
            shutil.rmtree(build, ignore_errors=True)  # renamed away unless it failed or lost

    def _repair(self, version: ArtifactVersion, layout: Layout, dest: str, sidecar: Sidecar | None) -> None:
        """Put the existing view right in place: folders first (real folders, no extra entries),
        then every file whose stamp changed, copied again from its blob."""
        before = find_stale(dest, layout, sidecar)
        for d in layout.dirs:
            self._real_folder(_join(dest, d))
        for d in before.dirs:
            for name in self._extras(dest, d, layout):
                self._set_aside(f"{_join(dest, d)}/{name}")
        files = find_stale(dest, layout, sidecar).files  # again: a folder fixed above may have emptied
        jobs = [(layout.files[rel], self._blobs.tmp_path("viewfile")) for rel in files]
        try:
            self._copy_all(version, jobs)
            for entry, tmp in jobs:
                target = f"{dest}/{entry.path}"
                if _is_dir(target):
                    self._set_aside(target)
                os.rename(tmp, target)  # one file at a time, atomically: readers see old or new bytes
        finally:
            for _, tmp in jobs:
                _unlink_quietly(tmp)

    def _real_folder(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path)
            return
        if not stat.S_ISDIR(st.st_mode):  # a file or a link (maybe to outside the store): replace it
            self._set_aside(path)
            os.mkdir(path)

    @staticmethod
    def _extras(dest: str, d: str, layout: Layout) -> list[str]:
        """Entries of folder ``d`` of the view that the manifest does not name."""
        path = _join(dest, d)
        if not _is_dir(path):
            return []
        expected = layout.children.get(d, set())
        return sorted(name for name in os.listdir(path) if name not in expected)

    def _set_aside(self, path: str) -> None:
        """Remove ``path`` (any kind) by renaming it into ``tmp/`` first: it leaves the view at once."""
        trash = self._blobs.tmp_path("trash")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        if _is_dir(trash):
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.unlink(trash)

    def _seal(self, version: ArtifactVersion, layout: Layout, dest: str, sidecar: Path) -> Sidecar:
        """Record the stamps of the now verified view, once its bytes and names are durable."""
        files = {rel: stamp_of(f"{dest}/{rel}") for rel in layout.files}
        dirs = {d: stamp_of(_join(dest, d)) for d in layout.dirs}
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            self._blobs.barrier(pool, [f"{dest}/{rel}" for rel in layout.files] + [_join(dest, d) for d in layout.dirs])
        record = {"ref": str(version.ref), "digest": version.digest, "files": files, "dirs": dirs}
        self._write_atomic(sidecar, json.dumps(record, separators=(",", ":")))
        self._hashes.flush()  # the blob stamps verified on the way
        # (a file that vanished right away has no stamp: it never matches, so it is copied again)
        return Sidecar(_known(files), _known(dirs))

    # ------------------------------------------------------------------------- verified copies
    def _copy_all(self, version: ArtifactVersion, jobs: Sequence[tuple[FileEntry, str]]) -> None:
        """Copy each entry's blob to its new file, verifying the bytes; if any did not match, move
        those blobs to quarantine and raise CorruptArtifact for the first."""

        def copy_batch(batch: list[int]) -> list[Copied]:
            return [self._copy_verified(*jobs[k]) for k in batch]

        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            results, error = map_all(pool, copy_batch, batches([entry.size for entry, _ in jobs]))
        if error is not None:
            raise error
        bad = sorted((c for group in results for c in group if not c.ok), key=lambda c: c.entry.path)
        if bad:
            moved = [None if c.blob is None else self._blobs.quarantine_blob(c.entry.sha256, c.blob) for c in bad]
            raise corrupt_error(version, bad[0], moved[0], len(bad))

    def _copy_verified(self, entry: FileEntry, target: str) -> Copied:
        try:
            src = os.open(self._blobs.blob_path(entry.sha256), os.O_RDONLY)
        except FileNotFoundError:
            return Copied(entry, False, None)
        try:
            before = os.fstat(src)
            sha = self._write_copy(src, before, target) if before.st_size == entry.size else None
            after = os.fstat(src)
        finally:
            os.close(src)
        if sha != entry.sha256:
            _unlink_quietly(target)
            return Copied(entry, False, before)
        if same_content_stamp(before, after):
            self._hashes.remember_verified(after, entry.sha256)
        return Copied(entry, True, before)

    def _write_copy(self, src: int, st: os.stat_result, target: str) -> str:
        """Create ``target`` read-only as a reflink or a copy of ``src``; the sha256 of its bytes."""
        dst = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o444)  # read-only file, writable fd
        try:
            if self._reflink(src, dst, st.st_dev):
                sha, _ = copy_and_hash(dst, None, st.st_size)  # the clone's own bytes, as consumers read them
            else:
                sha, _ = copy_and_hash(src, dst, st.st_size)
        except BaseException:
            os.close(dst)
            _unlink_quietly(target)
            raise
        os.close(dst)
        return sha

    def _reflink(self, src: int, dst: int, device: int) -> bool:
        if device in self._no_reflink:
            return False
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as e:
            if e.errno in _NO_REFLINK:
                self._no_reflink.add(device)
            return False
        return True


def corrupt_error(version: ArtifactVersion, bad: Copied, moved: str | None, count: int) -> CorruptArtifact:
    """One line: which version and file, what is wrong, and how to restore it."""
    f = bad.entry
    if bad.blob is None:
        what = "its stored bytes (blob) are missing"
    else:
        where = f"; the blob was moved to {moved}" if moved else ""
        what = f"its stored bytes do not match the manifest (sha256 {f.sha256[:16]}...){where}"
    more = f" (and {count - 1} more files)" if count > 1 else ""
    p = version.producer
    who = f" (job {p.job_label!r} of stage {p.stage!r})" if p is not None else ""
    return CorruptArtifact(
        f"artifact {version.ref} is corrupt: file {f.path!r}{more}: {what}. Restore it: rerun the job that produced it{who}"
        " with `submit --force` (or log the same files again), or run `python -m orchestrator fsck --repair` and"
        " submit again to recompute everything built on it"
    )


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
