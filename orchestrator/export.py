"""Copy a study's artifacts of one type (e.g. its figures) out of the store into a plain folder."""

from __future__ import annotations

from pathlib import Path

from orchestrator.artifacts import ReadOnlyStore
from orchestrator.artifacts.download import copy_out
from orchestrator.errors import BadArgument, OrchestratorError
from orchestrator.paths import StudyPaths
from orchestrator.records import read_plan


def export_type(paths: StudyPaths, store: ReadOnlyStore, artifact_type: str, out: Path) -> list[Path]:
    """Copy every committed ``artifact_type`` output of the study's jobs to ``out/<artifact name>/``.

    Files are copied out of the store's blobs (not linked), each verified against its digest while
    copied, so they can be edited or moved without touching the store, and nothing is written into
    the store (it may be read-only). Returns the folders written, in plan order.
    """
    if not paths.plan.exists():
        raise BadArgument(f"no study {paths.study!r} under {paths.root}; submit it first, or pass --store")
    written = []
    for job in read_plan(paths)["jobs"]:
        for ref in (store.job_outputs(job["key"]) or {}).values():
            version = store.get(ref)
            if version.type != artifact_type:
                continue
            written.append(copy_out(store, version, out / version.ref.name, overwrite=True))
    if not written:
        raise OrchestratorError(
            f"study {paths.study!r} has no committed {artifact_type!r} artifact yet; "
            f"does its spec have a stage producing one, and has it run? (python -m orchestrator status {paths.study})"
        )
    return written
