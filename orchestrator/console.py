"""How much the commands print: ``-q`` (errors, warnings and results only), default, ``-v`` (more detail).

One process-wide level, set once by the CLI from its global ``-q``/``-v`` flags; everything that
prints progress or chatter asks ``quiet()`` / ``verbose()`` instead of taking a flag of its own.
Results a command was asked for (a table, ``--json`` output) and errors are printed at every level.
"""

from __future__ import annotations

QUIET, NORMAL, VERBOSE = -1, 0, 1
_level = NORMAL


def set_level(level: int) -> None:
    """Set the level: QUIET, NORMAL or VERBOSE (values outside are clamped)."""
    global _level
    _level = max(QUIET, min(VERBOSE, level))


def level() -> int:
    return _level


def quiet() -> bool:
    """True under ``-q``: print no progress and no chatter."""
    return _level <= QUIET


def verbose() -> bool:
    """True under ``-v``: print detail too."""
    return _level >= VERBOSE
