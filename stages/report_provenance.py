"""Where every number of the report comes from: the artifact versions behind each input and figure,
and the jobs upstream of them.

:func:`source_records` names the artifact versions an input resolved to (for the captions and
figures.json) and :func:`lineage_rows` lists them for the page; :func:`upstream_closure` follows the
provenance's ``inputs`` links from a figure's artifact versions to every job upstream of them, so a
figure names exactly the jobs its data depend on. The Provenance section (:func:`provenance_blocks`)
shows the spec and its hash, the git commit and whether the tree had uncommitted changes, the Python
and package versions, and every upstream job with its parameters (long values cut), seed and
artifact version. The provenance is ``ctx.provenance`` as the engine passed it
(:data:`orchestrator.stage.PROVENANCE`); an older engine passes none, and the page says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from stages.report_inputs import INPUT_ORDER, ReportInputs
from stages.report_page import Block, Bullets, Heading, Para, Table


def source_records(study: ReportInputs, names: Sequence[str]) -> list[dict[str, Any]]:
    """The artifact versions behind ``names`` (input names), for captions and figures.json."""
    return [{"input": n, "ref": s.ref, "job_key": s.job_key, "point": dict(s.point)}
            for n in names for s in study.sources.get(n, [])]


def lineage_rows(study: ReportInputs) -> list[list[str]]:
    rows = []
    for name in INPUT_ORDER:
        for s in study.sources.get(name, []):
            point = ", ".join(f"{k}={v}" for k, v in sorted(s.point.items())) or "-"
            rows.append([name, s.ref, s.type, s.job_key, point])
    return rows


def upstream_closure(provenance: Mapping[str, Any], refs: Iterable[str]) -> list[dict[str, Any]]:
    """The provenance records of ``refs`` and of everything upstream of them (through ``inputs``),
    in the provenance's order (producers first)."""
    records = [r for r in provenance.get("upstream") or [] if isinstance(r, Mapping)]
    by_ref = {r.get("ref"): r for r in records}
    todo, seen = list(refs), set()
    while todo:
        ref = todo.pop()
        if ref in seen or ref not in by_ref:
            continue
        seen.add(ref)
        todo += list(by_ref[ref].get("inputs") or [])
    return [dict(r) for r in records if r.get("ref") in seen]


def _value_text(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def params_text(params: Mapping[str, Any] | None) -> str:
    """``k=v`` for every parameter (long values cut), or ``not recorded``."""
    if params is None:
        return "not recorded"
    return ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(params.items())) or "(defaults)"


def _dirty_text(commit: str | None) -> str:
    if not commit:
        return "not recorded"
    sha = commit.removesuffix("+dirty")
    return f"{sha}, with uncommitted changes" if commit.endswith("+dirty") else f"{sha} (clean)"


def upstream_rows(provenance: Mapping[str, Any]) -> list[list[str]]:
    return [[str(u.get("job_label") or "-"),
             f"{u.get('stage') or '-'} v{u.get('stage_version') or '?'}",
             str(u.get("ref") or "-"),
             "-" if u.get("seed") is None else str(u.get("seed")),
             _dirty_text(u.get("git_commit")),
             params_text(u.get("params"))]
            for u in provenance.get("upstream") or [] if isinstance(u, Mapping)]


def provenance_blocks(provenance: Mapping[str, Any]) -> list[Block]:
    """The Provenance section: spec, code, this job, packages and every upstream job."""
    if not provenance:
        return [Heading("Provenance"),
                Para("Provenance not recorded: the engine that ran this report passed none (an older version). The "
                     "inputs' lineage below still names every artifact version.")]
    code = provenance.get("code") or {}
    job = provenance.get("job") or {}
    items = [
        f"Study: {provenance.get('study') or '-'}; spec: {provenance.get('spec_path') or 'not recorded'} "
        f"(hash {provenance.get('spec_hash') or 'not recorded'}).",
        f"Code: git commit {_dirty_text(code.get('git_commit'))}; Python {code.get('python') or 'not recorded'}.",
        f"This report: job {job.get('label') or '-'}, stage {job.get('stage') or 'report'} "
        f"v{job.get('stage_version') or '?'}, seed {job.get('seed')}.",
    ]
    packages = sorted((code.get("packages") or {}).items())
    blocks: list[Block] = [Heading("Provenance"), Bullets(tuple(items))]
    if packages:
        blocks.append(Table(("package", "version"), tuple((k, str(v)) for k, v in packages)))
    rows = upstream_rows(provenance)
    if rows:
        blocks += [Para("Every upstream job, with the artifact version (store version) it produced:"),
                   Table(("job", "stage", "artifact version", "seed", "git commit", "parameters"),
                         tuple(tuple(r) for r in rows))]
    return blocks
