"""Quarantine: where the store moves what it found damaged, instead of deleting it.

``quarantine/<its path in the store>~<UTC time>-<unique>`` keeps the damaged thing (a corrupt blob,
an unreadable version folder, alias file or job record) for a person to look at, out of every
path the store reads, so that from then on it counts as missing: a missing blob or version is
something the store knows how to restore (log the same files again, rerun the job), a damaged one
is not. Nothing reads ``quarantine/``; delete it whenever you like.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

from .. import fsutil

FOLDER = "quarantine"


def quarantine(root: Path, path: Path, expect: tuple[int, int] | None = None) -> Path | None:
    """Move ``path`` (inside the store ``root``) to the quarantine; where it went, or None if it
    was gone already. With ``expect`` (st_dev, st_ino), only that very file is moved: one that a
    concurrent writer put in its place since it was judged (a repaired blob, a rerun's job record)
    is put back, and None returned."""
    dest = root / FOLDER / f"{path.relative_to(root)}~{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(path, dest)
    except FileNotFoundError:
        return None
    if expect is not None:
        st = os.lstat(dest)
        if (st.st_dev, st.st_ino) != expect:
            _put_back(dest, path)
            return None
    fsutil.fsync_path(path.parent)  # the removal is durable: a crash must not bring it back
    return dest


def _put_back(moved: Path, path: Path) -> None:
    """Return a file moved by mistake, unless yet another one has appeared at ``path`` meanwhile
    (a link, unlike a rename, never replaces an existing name)."""
    try:
        os.link(moved, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links here: leave it quarantined (it counts as missing; the store restores those)
        return
    os.unlink(moved)
