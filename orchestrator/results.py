"""The commands that read a study's results without changing anything: ``status`` and
``artifacts`` (its table, ``--lineage``, ``--show``, ``get REF --out DIR``), as text or
``--json``. They open the artifact store read-only, so they work on a store shared read-only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from orchestrator import console, views
from orchestrator.artifacts import ArtifactNotFound, ReadOnlyStore, open_reader
from orchestrator.artifacts.describe import tree_dict, upstream_tree, version_dict
from orchestrator.errors import BadArgument
from orchestrator.overview import study_outputs, study_status
from orchestrator.paths import StudyPaths

GET = "get"


def add_arguments(status_cmd: argparse.ArgumentParser, artifacts_cmd: argparse.ArgumentParser) -> None:
    """``--json`` for both; ``artifacts get REF --out DIR [--force]`` (the study positional reads
    ``get``, then the reference)."""
    for cmd in (status_cmd, artifacts_cmd):
        cmd.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    artifacts_cmd.add_argument("ref", nargs="?", metavar="REF", help="after `get`: NAME:vN, NAME:latest or NAME:ALIAS")
    artifacts_cmd.add_argument("--out", type=Path, metavar="DIR", help="get: the folder to copy its files into (created)")
    artifacts_cmd.add_argument("--force", action="store_true", help="get: replace DIR if it holds other files")


def status_command(args: argparse.Namespace) -> int:
    """``status STUDY [--json]``."""
    return status(StudyPaths(args.store.resolve(), args.study), as_json=args.json)


def artifacts_command(args: argparse.Namespace) -> int:
    """``artifacts STUDY [--lineage REF | --show REF] [--json]`` or ``artifacts get REF --out DIR``."""
    paths = StudyPaths(args.store.resolve(), args.study)
    if args.study == GET and (args.ref or args.out or not paths.plan.exists()):
        return get(paths.root, args.ref, args.out, force=args.force, as_json=args.json)
    if args.ref is not None or args.out is not None or args.force:
        raise BadArgument(
            "artifacts takes a study (artifacts STUDY [--lineage REF | --show REF]) or copies one version out"
            " (artifacts get REF --out DIR); --out and --force belong to get"
        )
    return artifacts(paths, lineage=args.lineage, show=args.show, as_json=args.json)


def print_json(value: Any) -> None:
    """One JSON document on stdout (what ``--json`` prints)."""
    print(json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False))


def reader_or_none(paths: StudyPaths) -> ReadOnlyStore | None:
    """The study's artifact store opened read-only; None if there is none yet."""
    try:
        return open_reader(paths.root)
    except ArtifactNotFound:
        return None


def reader(root: Path) -> ReadOnlyStore:
    """The artifact store under storage root ``root``, read-only; BadArgument if there is none."""
    try:
        return open_reader(root)
    except ArtifactNotFound:
        where = root / "artifacts"
        raise BadArgument(f"no artifact store under {root} (no {where}); pass the storage root with --store DIR") from None


def status(paths: StudyPaths, *, as_json: bool) -> int:
    """``status STUDY``: each job's state (asking each backend's scheduler), where it runs, its log."""
    from orchestrator.executors import StatusView
    from orchestrator.executors.registry import backend, names

    states = views.job_states(paths)
    by_key = {str(job["key"]): state for job, state in states}
    view = StatusView()
    for name in names():  # each backend's word on the jobs it ran or queued
        view.merge(backend(name).status(paths, by_key))
    if view.warning and not console.quiet():
        print(f"warning: {view.warning}", file=sys.stderr)
    shown = study_status(paths, view, states, store=reader_or_none(paths))
    if as_json:
        print_json(shown.to_dict())
    else:
        print(views.render_status(shown, verbose=console.verbose(), quiet=console.quiet()))
    return 0


def artifacts(paths: StudyPaths, *, lineage: str | None, show: str | None, as_json: bool) -> int:
    """``artifacts STUDY [--lineage REF | --show REF]``."""
    if lineage or show:
        store = reader(paths.root)
        ref = str(lineage or show)
        if as_json:
            version = views.named_version(store, ref)
            print_json(tree_dict(upstream_tree(store, version)) if lineage else version_dict(version))
        elif lineage:
            print(views.lineage_tree(store, ref, verbose=console.verbose()))
        else:
            print(views.version_details(store, ref, verbose=console.verbose()))
        return 0
    outputs = study_outputs(paths, reader_or_none(paths))
    if as_json:
        print_json(outputs.to_dict())
    else:
        text = views.render_artifacts(outputs, verbose=console.verbose(), quiet=console.quiet())
        if text:
            print(text)
    return 0


def get(root: Path, ref: str | None, out: Path | None, *, force: bool, as_json: bool) -> int:
    """``artifacts get REF --out DIR``: copy one version's files out, verified."""
    from orchestrator.artifacts.download import copy_out

    if ref is None or out is None:
        raise BadArgument("artifacts get needs a reference and a folder: artifacts get NAME[:vN|:ALIAS] --out DIR [--store DIR]")
    store = reader(root)
    version = views.named_version(store, ref)
    target = copy_out(store, version, out, overwrite=force)
    if as_json:
        print_json({**version_dict(version), "path": str(target)})
    elif console.quiet():
        print(target)
    else:
        n = len(version.files)
        print(f"{version.ref} [{version.type}]: {n} file{'s' * (n != 1)} ({version.size} bytes), verified, copied to {target}")
    return 0
