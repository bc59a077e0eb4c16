"""The -q/-v flags, before a command (``-q status demo``) and after it (``status demo -q``), with
the same meaning: both write the ``verbosity`` (``console`` levels) that ``main`` sets. After the
command they are added only when given, so a flag before the command stays in force when none
follows it."""

from __future__ import annotations

import argparse

from orchestrator import console

FLAGS = (
    (("-q", "--quiet"), console.QUIET, "print results and errors only"),
    (("-v", "--verbose"), console.VERBOSE, "print more detail"),
)


def add_before_command(parser: argparse.ArgumentParser) -> None:
    """The program's own -q/-v (default: the normal level)."""
    loud = parser.add_mutually_exclusive_group()
    for flags, level, help_ in FLAGS:
        loud.add_argument(*flags, dest="verbosity", action="store_const", const=level, help=help_)
    parser.set_defaults(verbosity=console.NORMAL)


def add_after_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Give every command of ``sub`` the -q/--quiet and -v/--verbose flags. A command whose -v
    shows something of its own says what with ``set_defaults(loud_help=...)`` (plan: parameters)."""
    for cmd in sub.choices.values():
        loud = cmd.add_mutually_exclusive_group()
        more = f" ({cmd.get_default('loud_help')})" if cmd.get_default("loud_help") else ""
        for flags, level, help_ in FLAGS:
            help_ += more if level == console.VERBOSE else ""
            loud.add_argument(*flags, dest="verbosity", action="store_const", const=level, default=argparse.SUPPRESS, help=help_)
