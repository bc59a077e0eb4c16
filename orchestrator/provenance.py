"""What produced an artifact version: recorded with every commit, handed to every stage.

Two views of the same facts:

- ``version_provenance``: stored with each committed version (``Producer.provenance``): the
  spec's hash, the job's key, stage version, parameters and seed, and this checkout's code
  (``code_provenance``: git commit with ``+dirty``, Python, host, package versions).
- ``stage_provenance``: what a running stage sees as ``ctx.provenance`` (format: ``PROVENANCE``
  in ``orchestrator.stage``): its own job, the spec it came from, and every artifact version
  upstream of its inputs, read back from the store's producer records, so that a report can say
  which parameters, code and versions fed each of its figures.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactError, ArtifactRef, ArtifactStore
from orchestrator.records import JobRecord

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "tokenizers", "numpy", "pydantic", "wandb")


def version_provenance(record: JobRecord, code: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce an artifact: spec, job, code and package versions, seed
    (``code``: ``code_provenance()``, computed here unless given)."""
    code = code_provenance() if code is None else code
    return {
        "spec_hash": record.spec_hash,
        "job_key": record.key,
        "stage_version": record.stage_version,
        "params": record.params,
        "seed": record.seed,
        **code,
    }


def stage_provenance(
    record: JobRecord, store: ArtifactStore, inputs: Iterable[ArtifactRef], code: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``ctx.provenance`` for the job of ``record``, whose resolved inputs are ``inputs``."""
    code = code_provenance() if code is None else code
    return {
        "study": record.study,
        "spec_path": record.spec_path,
        "spec_hash": record.spec_hash,
        "code": {k: code.get(k) for k in ("git_commit", "python", "packages")},
        "job": {
            "label": record.label,
            "stage": record.stage,
            "stage_version": record.stage_version,
            "params": record.params,
            "seed": record.seed,
        },
        "upstream": upstream(store, inputs),
    }


def upstream(store: ArtifactStore, refs: Iterable[ArtifactRef]) -> list[dict[str, Any]]:
    """Every version that ``refs`` descend from (themselves included), each once, producers
    before the versions made from them. Lineage that the store no longer holds ends the walk
    there (the entry says so with ``"missing": true``)."""
    out: list[dict[str, Any]] = []
    seen: set[ArtifactRef] = set()
    stack: list[tuple[ArtifactRef, bool]] = [(r, False) for r in reversed(list(refs))]
    entries: dict[ArtifactRef, dict[str, Any]] = {}
    while stack:  # iterative post-order: lineage can be deep, recursion limits are not
        ref, expanded = stack.pop()
        if expanded:
            out.append(entries[ref])
            continue
        if ref in seen:
            continue
        seen.add(ref)
        entries[ref] = entry = _entry(store, ref)
        stack.append((ref, True))
        for parent in reversed(entry["inputs"]):
            stack.append((ArtifactRef.parse(parent), False))
    return out


def _entry(store: ArtifactStore, ref: ArtifactRef) -> dict[str, Any]:
    try:
        version = store.get(ref)
    except ArtifactError:
        return {"ref": str(ref), "missing": True, "inputs": []}
    producer = version.producer
    prov: Mapping[str, Any] = producer.provenance if producer else {}
    return {
        "ref": str(ref),
        "type": version.type,
        "job_label": producer.job_label if producer else None,
        "stage": producer.stage if producer else None,
        "stage_version": prov.get("stage_version"),
        "params": prov.get("params"),
        "seed": prov.get("seed"),
        "spec_hash": prov.get("spec_hash"),
        "git_commit": prov.get("git_commit"),
        "created_at": version.created_at,
        "inputs": [str(r) for r in producer.inputs] if producer else [],
    }


def code_provenance() -> dict[str, Any]:
    """The part of provenance that is the same for every job run by one interpreter on one
    checkout: git commit (+dirty), Python, host and package versions.

    It costs ~10 ms (two git subprocesses, 8 package metadata files), a third of a trivial job,
    so the local executor computes it in the submitting process and hands it to its job
    processes (``run_job(..., code=...)``); a SLURM task, on its own node, computes its own.
    """
    return {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "packages": {p: v for p in PACKAGES if (v := _version(p))},
    }


def git_commit() -> str | None:
    """The commit of the checkout holding the stage code, with ``+dirty`` for uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    """The installed version of ``package`` (None if it is not installed).

    Reads the ``Version:`` header itself: ``importlib.metadata.version`` runs the email parser
    over the whole metadata file, long description included (8 ms for our 8 packages, not 3).
    """
    try:
        dist = importlib_metadata.distribution(package)
    except importlib_metadata.PackageNotFoundError:
        return None
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    for line in text.splitlines():
        if not line:  # the headers end at the first empty line
            break
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "version":
            return value.strip()
    return dist.version
