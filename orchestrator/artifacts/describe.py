"""Versions as plain data: a version as a JSON-ready dict, and the tree of the versions it was
built from (its lineage), shared by ``artifacts --json``, ``artifacts --lineage`` and
``orchestrator.api``. Reads only (``ArtifactStore.get``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import ArtifactError, ArtifactNotFound, ArtifactRef, ArtifactStore, ArtifactVersion, Producer

NO_LONGER_STORED = "no longer in the store"


def producer_dict(producer: Producer | None) -> dict[str, Any] | None:
    """The job that produced a version, its inputs and provenance (None: logged outside a study)."""
    if producer is None:
        return None
    return {
        "job_key": producer.job_key,
        "job_label": producer.job_label,
        "stage": producer.stage,
        "study": producer.study,
        "inputs": [str(r) for r in producer.inputs],
        "provenance": dict(producer.provenance),
    }


def version_dict(version: ArtifactVersion, *, files: bool = True) -> dict[str, Any]:
    """Everything a version's record says, JSON-ready; ``files=False`` leaves out the file list
    (``file_count`` and ``size`` stay), for listings of many versions."""
    out: dict[str, Any] = {
        "ref": str(version.ref),
        "name": version.ref.name,
        "version": version.ref.version,
        "type": version.type,
        "digest": version.digest,
        "size": version.size,
        "file_count": len(version.files),
        "created_at": version.created_at,
        "aliases": list(version.aliases),
        "metadata": dict(version.metadata),
        "producer": producer_dict(version.producer),
    }
    if files:
        out["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in version.files]
    return out


@dataclass(frozen=True)
class UpstreamNode:
    """One version in a lineage tree and the versions its producing job consumed.

    ``version`` is None when it cannot be read (``problem`` says why: no longer stored, or a
    damaged record). ``repeated``: the version appears earlier in the tree, which shows its inputs."""

    ref: ArtifactRef
    version: ArtifactVersion | None
    inputs: tuple[UpstreamNode, ...] = ()
    problem: str | None = None
    repeated: bool = False


def upstream_tree(store: ArtifactStore, version: ArtifactVersion) -> UpstreamNode:
    """``version`` and, recursively, the input versions of the job that produced each one."""
    seen: set[ArtifactRef] = set()

    def visit(ref: ArtifactRef, got: ArtifactVersion | None) -> UpstreamNode:
        try:
            current = got or store.get(ref)
        except ArtifactNotFound:
            return UpstreamNode(ref, None, problem=NO_LONGER_STORED)
        except ArtifactError as e:  # a damaged record: say so, show the rest of the tree
            return UpstreamNode(ref, None, problem=str(e))
        if ref in seen or current.producer is None:
            return UpstreamNode(ref, current, repeated=ref in seen)
        seen.add(ref)
        return UpstreamNode(ref, current, tuple(visit(parent, None) for parent in current.producer.inputs))

    return visit(version.ref, version)


def walk(node: UpstreamNode, depth: int = 0) -> Iterator[tuple[int, UpstreamNode]]:
    """(depth, node) for every node of the tree, in the order ``render_tree`` prints them."""
    yield depth, node
    for child in node.inputs:
        yield from walk(child, depth + 1)


def render_tree(node: UpstreamNode, *, full_keys: bool = False) -> str:
    """One line per node, indented by depth: ``name:vN [type] <- job label (job key)``."""
    lines = []
    for depth, n in walk(node):
        indent = "  " * depth
        if n.version is None:
            lines.append(f"{indent}{n.ref} ({n.problem})")
            continue
        p = n.version.producer
        by = f" <- {p.job_label} (job {p.job_key if full_keys else p.job_key[:12]})" if p else ""
        lines.append(f"{indent}{n.ref} [{n.version.type}]{by}" + (" (inputs shown above)" if n.repeated and p else ""))
    return "\n".join(lines)


def tree_dict(node: UpstreamNode) -> dict[str, Any]:
    """The tree as nested JSON-ready dicts: each version's ``version_dict`` (without its file list)
    and its ``inputs``; an unreadable one as ``{"ref", "problem"}``."""
    if node.version is None:
        return {"ref": str(node.ref), "problem": node.problem}
    return {
        **version_dict(node.version, files=False),
        "repeated": node.repeated,
        "inputs": [tree_dict(child) for child in node.inputs],
    }
