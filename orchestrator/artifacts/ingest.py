"""Steps 1-3 of ``LocalStore.log`` (see its module docstring): read each source file once, hash
it, copy it to a temporary blob or take it (``move=True``), and place new blobs in ``objects/``
behind a durability barrier. Also the blobs' upkeep: each blob's stamp is remembered when it is
placed or verified, so "is this blob intact?" costs one stat on the common path; a blob found
corrupt is moved to ``quarantine/`` and replaced from the source being logged (``ensure``)."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from .. import fsutil
from .base import ArtifactError
from .hashcache import HashCache
from .pool import BATCH_FILES, IO_THREADS, batches, map_all
from .quarantine import quarantine

CHUNK = 1 << 20  # copy and hash in 1 MiB pieces: fits the CPU cache, measured faster than 4 MiB
LINK_FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES}
# Temporary names: host and pid (fsck tells a dead owner by them), then a token of this process
# (a later process with the same pid must not collide with a dead one's leftovers) and a counter
# (``next`` on it is atomic under the GIL): no uuid4 and no hostname syscall per file.
_HOST = socket.gethostname()
_TOKEN = uuid.uuid4().hex[:12]
_SEQ = count()


@dataclass
class Ingested:
    """One source file after step 1 of ``log``: its digest, and what still has to be placed.
    (Paths are plain strings on this per-file path: pathlib objects cost more than the syscalls.)"""

    rel: str  # relative POSIX path in the version
    src: str
    sha: str
    size: int
    tmp: str | None = None  # a copy in tmp/ to rename to the blob's address
    taken: os.stat_result | None = None  # move: ``src`` itself becomes the blob; its stat when hashed


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _hash_fd(fd: int, out: int | None) -> tuple[str, int]:
    """(sha256, size) of what is left to read from the large file ``fd``, read once in chunks;
    each chunk is also written to ``out`` if given. Writeback of each chunk starts at once (of
    ``out``, or of ``fd`` itself: a job's fresh output that is to be moved may not be on disk yet),
    so the disk works while the CPU hashes and the barrier finds little left to write."""
    h, size, buf = hashlib.sha256(), 0, bytearray(CHUNK)
    view = memoryview(buf)
    while n := os.readv(fd, [buf]):
        chunk = view[:n]
        h.update(chunk)
        if out is not None:
            _write_all(out, chunk)
        fsutil.start_writeback(fd if out is None else out, size, n)
        size += n
    return h.hexdigest(), size


def copy_and_hash(src: int, dst: int | None, size_hint: int) -> tuple[str, int]:
    """(sha256, size) of what is left to read from ``src``, also written to ``dst`` if given. A
    file under a chunk (by ``size_hint``, its fstat size) is read whole in one call."""
    if size_hint >= CHUNK:
        return _hash_fd(src, dst)
    data = os.read(src, size_hint + 1)  # one more byte than expected: a larger file then mismatches
    if dst is not None:
        _write_all(dst, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def same_content_stamp(a: os.stat_result, b: os.stat_result) -> bool:
    """Same file, not written in between (a write moves mtime and ctime; reading moves neither)."""
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns,
    )  # fmt: skip


def _changed(src: str) -> ArtifactError:
    return ArtifactError(f"{src} changed while it was being logged; log it again once stable")


def discard(items: Iterable[Ingested]) -> None:
    """Remove the temporary blobs of ``items`` that were not placed."""
    for item in items:
        if item.tmp is not None:
            os.unlink(item.tmp)
            item.tmp = None


def list_source(source: Path) -> list[tuple[str, str, os.stat_result]]:
    """(relative POSIX path, file, its stat) for every file under ``source``, following file symlinks."""
    source = Path(source)
    if not source.is_dir():
        raise ArtifactError(f"cannot log {source}: it is not a directory (log a directory of files)")
    found: list[tuple[str, str, os.stat_result]] = []
    todo = [(str(source), "")]
    while todo:
        folder, prefix = todo.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                path, rel = entry.path, prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    todo.append((path, rel + "/"))
                    continue
                try:
                    st = entry.stat()  # follows a symlink to its file
                except FileNotFoundError:
                    st = None
                if st is not None and stat.S_ISDIR(st.st_mode):
                    raise ArtifactError(
                        f"cannot log {source}: {path} is a symlinked directory; copy its files into the source directory instead"
                    )
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise ArtifactError(f"cannot log {path}: not a regular file (broken symlink?)")
                found.append((rel, path, st))
    if not found:
        raise ArtifactError(f"cannot log {source}: the directory holds no files")
    return sorted(found, key=lambda f: f[0])


class BlobWriter:
    """Writes blobs into a store's ``objects/`` (through its ``tmp/``), durably."""

    def __init__(self, root: Path, hashes: HashCache) -> None:
        self.root = root
        self._hashes = hashes
        self._objects, self._tmp_dir = str(root / "objects"), str(root / "tmp")
        self._device = os.stat(self._objects).st_dev
        self._blob_dirs: set[str] = set()  # objects/xx folders known to exist (never removed, even when blobs are)

    def blob_path(self, sha: str) -> str:
        return f"{self._objects}/{sha[:2]}/{sha[2:]}"

    def tmp_path(self, kind: str) -> str:
        return f"{self._tmp_dir}/{_HOST}-{os.getpid()}-{_TOKEN}{next(_SEQ)}.{kind}"

    # Step 1: ingest ------------------------------------------------------------------------
    def ingest_all(
        self, pool: ThreadPoolExecutor, sources: Sequence[tuple[str, str, os.stat_result]], move: bool
    ) -> list[Ingested]:
        """Every source file hashed (and copied to tmp/ where needed), in ``sources`` order."""

        def ingest_batch(batch: list[int]) -> list[tuple[int, Ingested]]:
            done: list[tuple[int, Ingested]] = []
            try:
                for k in batch:
                    done.append((k, self._ingest(*sources[k], move)))
            except BaseException:
                discard(item for _, item in done)
                raise
            return done

        results, error = map_all(pool, ingest_batch, batches([st.st_size for _, _, st in sources]))
        done = sorted((pair for batch in results for pair in batch), key=lambda pair: pair[0])
        if error is not None:
            discard(item for _, item in done)
            raise error
        return [item for _, item in done]

    def _ingest(self, rel: str, src: str, st: os.stat_result, move: bool) -> Ingested:
        """One source file; ``st`` is its stat from the listing."""
        sha = self._hashes.known(st)
        if sha is not None and os.path.exists(self.blob_path(sha)):
            return Ingested(rel, src, sha, st.st_size)  # already stored: not read at all
        if move and self._may_take(src):
            return self._hash_in_place(rel, src)
        if st.st_size < CHUNK:
            return self._copy_small(rel, src, st)
        return self._copy_large(rel, src, st)

    def _may_take(self, src: str) -> bool:
        """Whether ``src`` can become a blob by a rename: nobody else can reach it through a link,
        it is on the store's filesystem, and this process may make it read-only."""
        st = os.lstat(src)
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_nlink == 1
            and st.st_dev == self._device
            and (st.st_uid == os.geteuid() or os.geteuid() == 0)
        )

    def _hash_in_place(self, rel: str, src: str) -> Ingested:
        os.chmod(src, 0o444)  # blobs are read-only; first, so that the chmod's ctime bump is in `before`
        fd = os.open(src, os.O_RDONLY)
        try:
            before = os.fstat(fd)
            if before.st_size < CHUNK:  # read whole: a 1 MiB buffer per small file costs more than its bytes
                data = os.read(fd, before.st_size + 1)
                sha, size = hashlib.sha256(data).hexdigest(), len(data)
            else:
                sha, size = _hash_fd(fd, None)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if size != before.st_size or not same_content_stamp(before, after):
            raise _changed(src)
        return Ingested(rel, src, sha, size, taken=after)

    def _copy_small(self, rel: str, src: str, st: os.stat_result) -> Ingested:
        """A file smaller than a chunk: read it whole, and write a temporary blob only if no blob
        with its digest exists yet."""
        fd = os.open(src, os.O_RDONLY)
        try:
            data = os.read(fd, st.st_size + 1)  # one read; more than the listing said fails the check
            after = os.fstat(fd)
        finally:
            os.close(fd)
        sha = hashlib.sha256(data).hexdigest()
        self._check_read(src, st, after, len(data), sha)
        if os.path.exists(self.blob_path(sha)):
            return Ingested(rel, src, sha, len(data))
        tmp = self.tmp_path("blob")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)  # a read-only file, a writable fd
        try:  # (no start_writeback: 20-40 us per call, as much as the write; barrier 1 does it in bulk)
            _write_all(fd, data)
        finally:
            os.close(fd)
        return Ingested(rel, src, sha, len(data), tmp=tmp)

    def _copy_large(self, rel: str, src: str, st: os.stat_result) -> Ingested:
        """Copy ``src`` to a temporary blob while hashing the same bytes (its digest, and so whether
        it is stored already, is known only at the end)."""
        tmp = self.tmp_path("blob")
        fd = os.open(src, os.O_RDONLY)
        try:
            sha, size = self._copy_fd(fd, tmp)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            self._check_read(src, st, after, size, sha)
        except ArtifactError:
            os.unlink(tmp)
            raise
        if os.path.exists(self.blob_path(sha)):  # identical content is stored already
            os.unlink(tmp)
            return Ingested(rel, src, sha, size)
        return Ingested(rel, src, sha, size, tmp=tmp)

    def _copy_fd(self, fd: int, tmp: str) -> tuple[str, int]:
        """(sha256, size) of the bytes read from ``fd`` and written to the new file ``tmp``."""
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            return _hash_fd(fd, out)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(out)

    def _check_read(self, src: str, st: os.stat_result, after: os.stat_result, size: int, sha: str) -> None:
        """Fail if ``src`` changed between its listing (``st``) and the end of reading it; else
        remember its digest."""
        if size != st.st_size or not same_content_stamp(st, after):
            raise _changed(src)
        self._hashes.remember(st, after, sha)

    # Steps 2-4: barrier, place, barrier -----------------------------------------------------
    def barrier(self, pool: ThreadPoolExecutor, paths: Iterable[str | Path]) -> None:
        """Make ``paths`` durable: their data (files) or entries (directories). One syncfs of the
        store's filesystem does it for all of them at once, where the OS has syncfs."""
        if fsutil.syncfs(self.root):
            return
        _, error = map_all(pool, fsutil.fsync_path, list(paths))
        if error is not None:
            raise error

    def place_all(self, pool: ThreadPoolExecutor, items: Sequence[Ingested]) -> None:
        """Steps 2 and 3: every new blob durably at its address (see the module docstring)."""
        unique: dict[str, Ingested] = {}
        for item in items:
            if item.tmp is None and item.taken is None:
                continue
            if item.sha in unique:  # the same content twice in this version: place it once
                discard([item])
                item.taken = None
            else:
                unique[item.sha] = item
        pending = list(unique.values())
        if not pending:
            return
        self.barrier(pool, [i.tmp or i.src for i in pending])
        for prefix in {i.sha[:2] for i in pending} - self._blob_dirs:
            os.makedirs(f"{self._objects}/{prefix}", exist_ok=True)
            self._blob_dirs.add(prefix)
        groups = [pending[k : k + BATCH_FILES] for k in range(0, len(pending), BATCH_FILES)]
        _, error = map_all(pool, self._place_group, groups)
        if error is not None:
            raise error

    def _place_group(self, group: Sequence[Ingested]) -> None:
        for item in group:
            self._place(item)

    def _place(self, item: Ingested) -> None:
        dest = self.blob_path(item.sha)
        if item.tmp is not None:
            os.rename(item.tmp, dest)  # over a concurrent identical blob at worst: both are durable
            item.tmp = None
            self._remember_placed(dest, item.sha, None)
        elif item.taken is not None and not os.path.exists(dest):  # (if it exists, the source stays put)
            self._take(item, dest)
            self._remember_placed(dest, item.sha, item.taken)

    def _remember_placed(self, dest: str, sha: str, taken: os.stat_result | None) -> None:
        """Remember the stamp of a blob just placed (the rename moved its ctime), so that checking
        it later costs a stat. A taken file must still be the one hashed: same inode, size and
        mtime (a write would have moved mtime)."""
        st = os.stat(dest)
        if taken is None or (st.st_ino, st.st_size, st.st_mtime_ns) == (taken.st_ino, taken.st_size, taken.st_mtime_ns):
            self._hashes.remember_verified(st, sha)

    def _take(self, item: Ingested, dest: str) -> None:
        """Rename the hashed source file to ``dest`` (it was made durable by barrier 1)."""
        if item.taken is None or not same_content_stamp(item.taken, os.stat(item.src)):
            raise _changed(item.src)
        try:
            os.rename(item.src, dest)
            return
        except OSError as e:  # another mount of the same filesystem: copy after all
            if e.errno not in LINK_FALLBACK_ERRNOS:
                raise
        tmp = self._copy_for_repair(item)
        fsutil.fsync_path(tmp)  # barrier 1 is behind us: this copy needs its own
        os.rename(tmp, dest)

    # Upkeep: intact blobs, and replacing the others ------------------------------------------
    def hash_blob(self, sha: str) -> tuple[bool, os.stat_result | None]:
        """(whether blob ``sha`` holds exactly its content, its stat when read: None if missing),
        reading it whole; an intact blob's stamp is remembered. Changes nothing in the store."""
        try:
            fd = os.open(self.blob_path(sha), os.O_RDONLY)
        except FileNotFoundError:
            return False, None
        try:
            before = os.fstat(fd)
            got, _ = copy_and_hash(fd, None, before.st_size)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if got == sha and same_content_stamp(before, after):
            self._hashes.remember_verified(after, sha)
        return got == sha, before

    def quarantine_blob(self, sha: str, judged: os.stat_result) -> str | None:
        """Move blob ``sha`` to ``quarantine/`` if it is still the file found corrupt (``judged``:
        its stat then), so that it counts as missing from now on; a blob put in its place since is
        left alone. Where it went, or None."""
        moved = quarantine(self.root, Path(self.blob_path(sha)), expect=(judged.st_dev, judged.st_ino))
        return None if moved is None else str(moved)

    def intact(self, sha: str) -> bool:
        """Whether blob ``sha`` exists and holds its content: one stat when its stamp is remembered,
        else it is read once (and a corrupt one is moved to quarantine)."""
        try:
            st = os.stat(self.blob_path(sha))
        except FileNotFoundError:
            return False
        if self._hashes.known(st) == sha:
            return True
        ok, judged = self.hash_blob(sha)
        if not ok and judged is not None:
            self.quarantine_blob(sha, judged)
        return ok

    def ensure(self, pool: ThreadPoolExecutor | None, items: Sequence[Ingested]) -> None:
        """Every blob ``items`` name is present and intact afterwards: a missing or corrupt one (the
        latter moved to quarantine first) is replaced from its item's temporary blob, taken file or
        source, whose bytes have that digest by construction (checked again while copied). Same
        durability as a first log: the replacement's bytes, then its name, reach stable storage."""
        unique = {item.sha: item for item in reversed(items)}  # the first item of each digest
        broken = [item for item in unique.values() if not self.intact(item.sha)]
        if not broken:
            return
        if pool is not None:
            self._replace(pool, broken)
            return
        with ThreadPoolExecutor(max_workers=IO_THREADS) as own:
            self._replace(own, broken)

    def _replace(self, pool: ThreadPoolExecutor, broken: Sequence[Ingested]) -> None:
        try:
            for item in broken:
                if item.tmp is None and item.taken is None:
                    item.tmp = self._copy_for_repair(item)
            self.place_all(pool, broken)  # barrier 1, then the renames
        finally:
            discard(broken)
        self.barrier(pool, {os.path.dirname(self.blob_path(item.sha)) for item in broken})  # barrier 2

    def _copy_for_repair(self, item: Ingested) -> str:
        """A temporary blob copied from ``item.src``, whose bytes must hash to ``item.sha`` (for a
        repair, or a taken file that cannot be renamed after all)."""
        tmp = self.tmp_path("blob")
        fd = os.open(item.src, os.O_RDONLY)
        try:
            sha, _ = self._copy_fd(fd, tmp)
        finally:
            os.close(fd)
        if sha != item.sha:
            os.unlink(tmp)
            raise _changed(item.src)
        return tmp
