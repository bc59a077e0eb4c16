"""Aliases of a local store's artifacts (``aliases.json`` per artifact: alias -> version number):
checking a new alias, and moving or dropping aliases under the artifact's lock. Aliases are
pointers, not lineage: a damaged alias file is quarantined and the aliases start afresh."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from .base import ArtifactError, DamagedRecord
from .locking import file_lock
from .quarantine import quarantine
from .reading import VERSION_DIR_RE, StoreReader

ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+\-]{0,127}\Z")


class AliasWriter(StoreReader):
    """The alias writes of ``LocalStore`` (which sets up ``lock_timeout_s`` and ``_write_atomic``)."""

    lock_timeout_s: float | None
    _write_atomic: Callable[..., None]

    @staticmethod
    def _check_alias(alias: str) -> str:
        if not ALIAS_RE.match(alias) or VERSION_DIR_RE.match(alias):
            raise ArtifactError(
                f"invalid alias {alias!r}: use up to 128 letters, digits and . _ = , + -, starting with a"
                " letter or digit, and not of the form vN (that names a version)"
            )
        return alias


    def _healed_aliases(self, name: str) -> dict[str, int]:
        """The aliases of ``name``; a damaged alias file is moved to quarantine and the aliases
        start afresh (they are pointers, not lineage). The caller holds the artifact's lock."""
        try:
            return self._aliases(name)
        except DamagedRecord as e:
            quarantine(self.root, e.path)
            return {}

    def _add_aliases(self, name: str, number: int, aliases: Sequence[str]) -> None:
        """Point ``aliases`` at the committed version ``number``, under the lock."""
        if aliases:
            with file_lock(self._art_dir(name) / "lock", self.lock_timeout_s):
                self._set_aliases(name, number, aliases)

    def _set_aliases(self, name: str, number: int, aliases: Sequence[str]) -> None:
        """Point ``aliases`` at ``number`` (moving them from other versions). Caller holds the lock."""
        current = self._healed_aliases(name)
        current.update({a: number for a in aliases})
        self._write_atomic(self._art_dir(name) / "aliases.json", json.dumps(current, indent=1))

    def _drop_aliases(self, name: str, dropped: Sequence[str]) -> None:
        """Remove ``dropped`` from the aliases of ``name`` (fsck: they name missing versions)."""
        with file_lock(self._art_dir(name) / "lock", self.lock_timeout_s):
            current = self._healed_aliases(name)
            for alias in dropped:
                current.pop(alias, None)
            self._write_atomic(self._art_dir(name) / "aliases.json", json.dumps(current, indent=1))
