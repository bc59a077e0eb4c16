"""How the user runs us: the command's name (``orchestrator``, the console script, or ``python -m
orchestrator``) and the installed version (``--version``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orchestrator

DISTRIBUTION = "cross-lingual-subnets"
SCRIPT = "orchestrator"  # pyproject.toml's [project.scripts]


def name(argv0: str | None = None) -> str:
    """``python -m orchestrator`` when started so (argv[0] is then the package's ``__main__.py``), else
    the console script's name."""
    first = Path(sys.argv[0] if argv0 is None else argv0)
    return f"python -m {SCRIPT}" if first.name == "__main__.py" else SCRIPT


def version() -> str:
    """The installed distribution's version; the package's own ``__version__`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:
        return orchestrator.__version__


class VersionAction(argparse.Action):
    """``--version``: print ``orchestrator <version>`` and exit (the version is looked up only then)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help or "print the version and exit")

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        print(f"{SCRIPT} {version()}")
        parser.exit()
