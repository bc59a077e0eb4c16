"""Copying a version's files out of a store, verified, writing nothing into the store.

``copy_out`` copies every file from its blob into a new folder next to the target, hashing the
bytes as it writes them; only when every file matched its manifest digest is the folder renamed
to the target. A missing or corrupt blob raises ``CorruptArtifact`` naming the file, and leaves
nothing behind: no partial target, no temporary folder, no parent folder it had created. Nothing
is quarantined or remembered (the store may be read-only); ``fsck --repair`` by someone who may
write to the store does that.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.errors import BadArgument

from .base import ArtifactVersion, FileEntry
from .hashcache import sha256_file
from .ingest import copy_and_hash
from .pool import IO_THREADS, batches, map_all
from .readonly import ReadOnlyStore
from .views import Copied, Layout, corrupt_error


def copy_out(store: ReadOnlyStore, version: ArtifactVersion, target: Path | str, *, overwrite: bool = False) -> Path:
    """Copy ``version``'s files to the folder ``target`` (at their relative paths), each verified
    against its sha256 while copied; returns ``target`` as an absolute path.

    ``target`` must not exist, or be an empty folder, or already hold exactly these files (then
    it is verified and left as it is). ``overwrite=True`` replaces whatever else is there, once
    the new copy is complete. Raises CorruptArtifact (naming the file) if the store's bytes do
    not match, BadArgument for a target that cannot be used; either way nothing is left behind."""
    target = Path(os.path.abspath(target))
    _check_target(store, target, overwrite)
    if _holds(target, version):
        return target
    if os.path.lexists(target) and not _empty_dir(target) and not overwrite:
        raise BadArgument(
            f"{target} exists and holds other files than {version.ref}; remove it or choose another folder"
            " (the Python API: download(..., overwrite=True))"
        )
    created = _make_parents(target.parent)
    partial = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        os.mkdir(partial)
        _copy_all(store, version, partial)
        _swap_in(partial, target, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    return target


def read_verified(store: ReadOnlyStore, version: ArtifactVersion, path: str) -> bytes:
    """The bytes of ``version``'s file ``path``, checked against its digest (CorruptArtifact if
    they differ or are missing)."""
    entry = next((f for f in version.files if f.path == path), None)
    if entry is None:
        shown = ", ".join(f.path for f in version.files[:12]) + (", ..." if len(version.files) > 12 else "")
        raise BadArgument(f"{version.ref} has no file {path!r}; its files: {shown}")
    try:
        data = store.blob_path(entry.sha256).read_bytes()
    except FileNotFoundError:
        raise corrupt_error(version, Copied(entry, False, None), None, 1) from None
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise corrupt_error(version, Copied(entry, False, os.stat(store.blob_path(entry.sha256))), None, 1)
    return data


def _check_target(store: ReadOnlyStore, target: Path, overwrite: bool) -> None:
    if target == store.root or target.is_relative_to(store.root) or store.root.is_relative_to(target):
        raise BadArgument(f"cannot copy an artifact to {target}: it is in the artifact store (or holds it); pick another folder")
    if overwrite and Path.cwd().resolve().is_relative_to(target.resolve()):
        raise BadArgument(f"will not replace {target}: it holds the current directory; choose another folder")
    if os.path.lexists(target) and not target.is_dir() and not overwrite:
        raise BadArgument(f"{target} exists and is not a folder; choose another path")


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(os.scandir(path))


def _holds(target: Path, version: ArtifactVersion) -> bool:
    """Whether ``target`` is a folder holding exactly ``version``'s files, byte for byte."""
    if not target.is_dir() or target.is_symlink():
        return False
    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(target):
        for name in files:
            path = Path(folder) / name
            found[path.relative_to(target).as_posix()] = path
        if any(os.path.islink(os.path.join(folder, d)) for d in dirs):
            return False
    wanted = {f.path: f for f in version.files}
    if set(found) != set(wanted):
        return False
    return all(
        not found[p].is_symlink() and found[p].stat().st_size == f.size and sha256_file(found[p]) == f.sha256
        for p, f in wanted.items()
    )


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(p)
    return list(reversed(missing))


def _copy_all(store: ReadOnlyStore, version: ArtifactVersion, dest: Path) -> None:
    layout = Layout.of(version.files)
    for d in layout.dirs:
        if d:
            os.mkdir(dest / d)
    entries = list(version.files)

    def copy_batch(batch: list[int]) -> list[Copied]:
        return [_copy_one(store, entries[k], dest / entries[k].path) for k in batch]

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        results, error = map_all(pool, copy_batch, batches([e.size for e in entries]))
    if error is not None:
        raise error
    bad = sorted((c for group in results for c in group if not c.ok), key=lambda c: c.entry.path)
    if bad:
        raise corrupt_error(version, bad[0], None, len(bad))


def _copy_one(store: ReadOnlyStore, entry: FileEntry, target: Path) -> Copied:
    try:
        src = os.open(store.blob_path(entry.sha256), os.O_RDONLY)
    except FileNotFoundError:
        return Copied(entry, False, None)
    try:
        st = os.fstat(src)
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            sha, size = copy_and_hash(src, dst, st.st_size)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return Copied(entry, sha == entry.sha256 and size == entry.size, st)


def _swap_in(partial: Path, target: Path, overwrite: bool) -> None:
    """Put the complete ``partial`` folder at ``target``: a rename (over an empty folder, too);
    with ``overwrite``, anything else there is renamed aside first and removed once the new folder
    is in place."""
    try:
        os.rename(partial, target)
        return
    except OSError:
        if not os.path.lexists(target):
            raise
        if not overwrite:
            raise BadArgument(f"{target} was filled by someone else meanwhile; remove it or choose another folder") from None
    aside = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.old"
    os.rename(target, aside)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(aside, target)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
