"""Remembered file digests, so logging content that is already in the store does not re-read it.

A file's sha256 is remembered under its identity and change stamps (device, inode, size, mtime and
ctime in ns), as git's index and DVC do. Any write changes mtime/ctime, so a changed file misses.
To avoid git's "racily clean" problem (file timestamps tick coarsely: a rewrite within the same
tick keeps the stamps), files modified less than ``SETTLE_S`` before hashing are not remembered.
The store's own blobs are the exception (``remember_verified``): it wrote them itself, read-only,
and nobody else writes to them, so their stamps are remembered at once.
Entries are JSON lines appended to one file (each ``flush`` is one append of whole lines, which
is atomic, so concurrent writers are safe); a torn or foreign line is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

CHUNK = 1 << 20
SETTLE_S = 2.0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_file(path: Path) -> str:  # a seam for tests that count reads
    return sha256_file(path)


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class HashCache:
    def __init__(self, path: Path, settle_s: float = SETTLE_S) -> None:
        self.path = path
        self.settle_s = settle_s
        self._known: dict[str, str] | None = None
        self._unsaved: list[str] = []  # lines for the file, appended by ``flush``
        self._lock = threading.Lock()

    def sha256(self, file: Path) -> str:
        """The file's sha256, from memory when its stamps are unchanged since it was last hashed."""
        before = file.stat()
        sha = self.known(before)
        if sha is None:
            sha = hash_file(file)
            self.remember(before, file.stat(), sha)
            self.flush()
        return sha

    def known(self, st: os.stat_result) -> str | None:
        """The remembered sha256 of the file that ``st`` (a stat of it) describes, if any."""
        return self._load().get(_stamp(st))

    def remember(self, before: os.stat_result, after: os.stat_result, sha: str) -> None:
        """Remember ``sha`` for a file hashed between the stats ``before`` and ``after``, unless it
        changed meanwhile or was modified too recently for its stamps to be trusted. In memory
        at once; in the file after the next ``flush``."""
        stamp = _stamp(before)
        settled = time.time() - max(before.st_mtime, before.st_ctime) > self.settle_s
        if settled and _stamp(after) == stamp:
            known = self._load()
            with self._lock:
                known[stamp] = sha
                self._unsaved.append(json.dumps([stamp, sha]) + "\n")

    def remember_verified(self, st: os.stat_result, sha: str) -> None:
        """Remember ``sha`` for a file the store wrote itself or has just verified (a blob), without
        the settle rule: blobs are written once, read-only, and only by the store, so a rewrite
        within one timestamp tick (what the rule guards against) does not happen to them."""
        stamp = _stamp(st)
        known = self._load()
        with self._lock:
            if known.get(stamp) != sha:
                known[stamp] = sha
                self._unsaved.append(json.dumps([stamp, sha]) + "\n")

    def flush(self) -> None:
        """Append what was remembered since the last flush to the file, in one write (one per
        log of many files, not one open/write/close per file)."""
        with self._lock:
            if not self._unsaved:
                return
            data, self._unsaved = "".join(self._unsaved).encode(), []
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    def _load(self) -> dict[str, str]:
        with self._lock:
            if self._known is None:
                self._known = {}
                if self.path.exists():
                    for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                        try:
                            stamp, sha = json.loads(line)
                        except (ValueError, TypeError):
                            continue
                        if isinstance(stamp, str) and isinstance(sha, str) and len(sha) == 64:
                            self._known[stamp] = sha
            return self._known
