"""Expand a validated study into a DAG of jobs (stage x matrix point) with deterministic keys.

A job's key is the sha256 of (stage id, stage name, stage code version, parameters, seed, and the
keys and output names of its upstream jobs). The same spec gives the same keys on every run and
machine; changing one parameter changes that job's key and every key downstream of it, nothing else.

Matching across matrices: an input of a job at point P takes the upstream jobs whose matrix points
agree with P on every axis both stages share. A ``many=True`` input gathers all of them (e.g. one
mask per language); otherwise exactly one must match.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.checks import problem_issue, stage_problems
from orchestrator.errors import SpecError, SpecIssue
from orchestrator.resources import parse_selector, point_text, selector_matches
from orchestrator.spec import (
    DEFAULT_MAX_JOBS,
    MATRIX_SEED,
    Study,
    canonical_json,
    count_text,
    input_output,
    input_stage,
    one_per_field,
    too_many_jobs,
)
from orchestrator.stage import Registry, StageDef
from orchestrator.sweep import SweepAxis, drawn_points

Point = Mapping[str, Any]


@dataclass(frozen=True)
class Upstream:
    job_key: str
    output: str
    point: Point


@dataclass(frozen=True)
class Binding:
    """An input of a job bound to the upstream job outputs it reads."""

    name: str
    type: str
    many: bool
    upstream: tuple[Upstream, ...]


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    artifact: str  # artifact name in the store


@dataclass(frozen=True)
class Job:
    """One unit of work: a stage at one matrix (and sweep) point, with its validated params, its
    seed, the upstream jobs it reads (``inputs``) and the artifacts it writes (``outputs``). Its
    ``key`` covers all of that and its upstream keys, never where or how it runs."""

    key: str
    stage_id: str
    stage: str
    stage_version: str
    label: str  # "prune[language=en,threshold=1.1]"
    point: Point
    params: Mapping[str, Any]  # validated, JSON-compatible, defaults included
    seed: int
    inputs: tuple[Binding, ...]
    outputs: tuple[Output, ...]
    also_at: tuple[Point, ...] = ()  # further sweep points that yield this very job (same key)

    @property
    def deps(self) -> tuple[str, ...]:
        """Upstream job keys, each once, in input order."""
        return tuple(dict.fromkeys(u.job_key for b in self.inputs for u in b.upstream))


@dataclass
class Plan:
    """A study expanded into jobs, in dependency order: what executors run and records describe."""

    study: Study
    jobs: list[Job]  # topological order: every job after all of its dependencies
    by_key: dict[str, Job] = field(init=False)

    def __post_init__(self) -> None:
        self.by_key = {job.key: job for job in self.jobs}

    def downstream(self, keys: set[str]) -> set[str]:
        """Every job that depends, directly or not, on one of ``keys`` (``keys`` excluded)."""
        found: set[str] = set()
        for job in self.jobs:  # topological order: one pass suffices
            if any(d in keys or d in found for d in job.deps):
                found.add(job.key)
        return found

    def stage_jobs(self, stage_id: str) -> list[Job]:
        return [job for job in self.jobs if job.stage_id == stage_id]


def build_plan(study: Study, registry: Registry, max_jobs: int | None = DEFAULT_MAX_JOBS) -> Plan:
    """Expand ``study`` (already checked against ``registry``) into a Plan; raise SpecError on
    cycles, on inputs that do not match exactly one upstream job where one is needed, and on plans
    of more than ``max_jobs`` jobs (None: no cap), counted before anything is expanded."""
    jobs_by_stage: dict[str, list[Job]] = {}
    order = stage_order(study, registry)
    points = drawn_points(study.sweep or {})
    if max_jobs is not None and points > max_jobs:  # before the points are drawn
        what = f"run_cap {count_text(points)} draws as many jobs per swept stage"
        raise SpecError([study.issue(("sweep", "run_cap"), too_many_jobs(what, max_jobs))])
    axes = sweep_axes_by_stage(study, registry, order)
    if max_jobs is not None:
        check_job_count(study, axes, max_jobs)
    for sid in order:
        stage_def = registry.get(study.stage_name(sid))
        if stage_def is None:
            raise SpecError([study.issue(("stages", sid), f"no stage named {study.stage_name(sid)!r}")])
        jobs_by_stage[sid] = _expand_stage(study, sid, stage_def, jobs_by_stage, registry, axes[sid])
    check_jobs(study, jobs_by_stage, registry)
    check_resource_selectors(study, jobs_by_stage)
    return Plan(study, [job for jobs in jobs_by_stage.values() for job in jobs])


def check_jobs(study: Study, jobs_by_stage: Mapping[str, list[Job]], registry: Registry) -> None:
    """Ask each stage's ``check`` about each distinct params of its jobs (see CheckFn): the problems
    found without running become spec errors at the lines of the parameters they name."""
    issues: dict[SpecIssue, None] = {}  # a dict: ordered, without repeats
    for sid, jobs in jobs_by_stage.items():
        stage_def = registry.get(study.stage_name(sid))
        if stage_def is None or stage_def.check is None:
            continue
        for job in jobs:
            for problem in stage_problems(stage_def, job.params):
                issues[problem_issue(study, sid, stage_def, job.label if job.point else None, problem)] = None
    if issues:
        raise SpecError(one_per_field(list(issues)))


def check_resource_selectors(study: Study, jobs_by_stage: Mapping[str, list[Job]]) -> None:
    """Every ``executor.resources`` key ``<stage>[<axis>=<value>,...]`` must match a job of its
    stage: a typo in a point would otherwise give no job the resources meant for it."""
    issues = []
    for key in study.executor.resources:
        sid, pairs = parse_selector(key)
        jobs = jobs_by_stage.get(sid, [])
        if not pairs or any(selector_matches(pairs, job.point) for job in jobs):
            continue
        names = dict.fromkeys(a for j in jobs for a in j.point)
        axes = {axis: sorted({point_text(j.point[axis]) for j in jobs}) for axis in names}
        unknown = [a for a in pairs if a not in axes]
        if unknown:
            valid = ", ".join(axes) or "none (it has no matrix)"
            message = f"stage {sid!r} has no matrix axis {unknown[0]!r}; its axes: {valid}"
        else:
            values = "; ".join(f"{a}: {', '.join(axes[a])}" for a in pairs)
            message = f"matches no job of stage {sid!r}; its points have {values}"
        issues.append(study.issue(("executor", "resources", key), message))
    if issues:
        raise SpecError(issues)


def stage_job_counts(study: Study, axes: Mapping[str, list[SweepAxis]]) -> dict[str, int]:
    """How many jobs each stage expands to at most (the product of its matrix and sweep axes'
    lengths; identical sweep points may collapse into fewer), without expanding anything."""
    counts = {}
    for sid, stage_axes in axes.items():
        matrix = {**study.stages[sid].matrix, **{a.name: a.values for a in stage_axes}}
        counts[sid] = math.prod(len(values) for values in matrix.values())
    return counts


def check_job_count(study: Study, axes: Mapping[str, list[SweepAxis]], max_jobs: int) -> None:
    """Refuse a plan of more than ``max_jobs`` jobs, naming the stage with the most."""
    counts = stage_job_counts(study, axes)
    total = sum(counts.values())
    if total <= max_jobs:
        return
    sid = max(counts, key=lambda s: counts[s])
    what = f"the plan would have {count_text(total)} jobs ({sid}: {count_text(counts[sid])})"
    raise SpecError([study.issue(_largest_factor(study, sid, axes[sid]), too_many_jobs(what, max_jobs))])


def _largest_factor(study: Study, sid: str, axes: list[SweepAxis]) -> tuple[str, ...]:
    """Where most of stage ``sid``'s jobs come from: its matrix or the sweep."""
    matrix = math.prod(len(values) for values in study.stages[sid].matrix.values())
    swept = math.prod(len(a.values) for a in axes)
    if axes and swept >= matrix:
        return ("sweep", "parameters")
    return ("stages", sid, "matrix") if study.stages[sid].matrix else ("stages",)


def sweep_axes_by_stage(study: Study, registry: Registry, order: list[str]) -> dict[str, list[SweepAxis]]:
    """The sweep axes of each stage: those targeting it plus those carried from its upstream stages,
    minus the ones it ``collect``s."""
    axes = study.sweep_axes()
    out: dict[str, list[SweepAxis]] = {}
    for sid in order:
        direct = [a for a in axes if any(t == sid for t, _ in a.targets)]
        carried = [a for up in _stage_deps(study, sid, registry) for a in out[up]]
        collect = set(study.stages[sid].collect)
        out[sid] = [a for a in dict.fromkeys([*direct, *carried]) if a.name not in collect]
    return out


def stage_order(study: Study, registry: Registry) -> list[str]:
    """Stage ids in dependency order (Kahn's algorithm); a cycle is a SpecError naming it."""
    deps = {sid: _stage_deps(study, sid, registry) for sid in study.stages}
    order: list[str] = []
    ready = [sid for sid in study.stages if not deps[sid]]
    remaining = {sid: set(d) for sid, d in deps.items() if d}
    while ready:
        sid = ready.pop(0)
        order.append(sid)
        for other in list(remaining):
            remaining[other].discard(sid)
            if not remaining[other]:
                del remaining[other]
                ready.append(other)
    if remaining:
        cycle = " -> ".join(reversed(_find_cycle(remaining)))  # reversed: arrows follow the data
        raise SpecError([study.issue(("stages",), f"the stages' inputs form a cycle: {cycle}")])
    return order


def _stage_deps(study: Study, sid: str, registry: Registry) -> set[str]:
    spec = study.stages[sid]
    stage_def = registry.get(study.stage_name(sid))
    names = set(spec.inputs) | set(stage_def.inputs if stage_def else ())
    found = {input_stage(study, spec, name) for name in names}
    return {s for s in found if s is not None and s in study.stages}


def _find_cycle(remaining: dict[str, set[str]]) -> list[str]:
    start = next(iter(remaining))
    path, seen = [start], {start}
    while True:
        nxt = next(iter(remaining[path[-1]]))
        if nxt in seen:
            return [*path[path.index(nxt) :], nxt]
        path.append(nxt)
        seen.add(nxt)


def matrix_points(matrix: Mapping[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """The cartesian product of the matrix axes, in spec order ({} for no matrix)."""
    axes = list(matrix)
    for values in itertools.product(*(matrix[a] for a in axes)):
        yield dict(zip(axes, values, strict=True))


def _expand_stage(
    study: Study,
    sid: str,
    stage_def: StageDef,
    done: dict[str, list[Job]],
    registry: Registry,
    axes: list[SweepAxis],
) -> list[Job]:
    spec = study.stages[sid]
    matrix = {**spec.matrix, **{a.name: list(a.values) for a in axes}}
    wiring = {name: _wire(study, sid, name, decl.type, registry) for name, decl in stage_def.inputs.items()}
    indexes = {name: _index(done[w[0]], matrix) for name, w in wiring.items() if w is not None}
    jobs: dict[str, Job] = {}
    for point in matrix_points(matrix):
        own = {k: v for k, v in point.items() if k in spec.matrix and k != MATRIX_SEED}
        swept: dict[str, Any] = {}
        for axis in axes:
            swept.update(axis.assignments(sid, point[axis.name]))
        default_seed = spec.seed if spec.seed is not None else study.seed
        seed = int(swept.pop(MATRIX_SEED, point.get(MATRIX_SEED, default_seed)))
        params = _params(study, stage_def.params, {**spec.params, **own, **swept}, point, sid)
        inputs = tuple(
            _bind(study, sid, name, decl.many, wiring[name], indexes[name], point, decl.type)
            for name, decl in stage_def.inputs.items()
            if wiring[name] is not None
        )
        key = job_key(sid, stage_def, params, seed, inputs)
        if key in jobs:  # another sweep point gives the very same job: run it once
            jobs[key] = replace(jobs[key], also_at=(*jobs[key].also_at, point))
            continue
        outputs = tuple(Output(n, t, artifact_name(study.name, sid, n, point)) for n, t in stage_def.outputs.items())
        jobs[key] = Job(key, sid, stage_def.name, stage_def.version, job_label(sid, point), point, params, seed, inputs, outputs)
    return list(jobs.values())


def _wire(study: Study, sid: str, name: str, type_: str, registry: Registry) -> tuple[str, str] | None:
    """(upstream stage id, upstream output name) feeding input ``name`` of stage ``sid``."""
    spec = study.stages[sid]
    upstream = input_stage(study, spec, name)
    if upstream is None:
        return None
    up_def = registry.get(study.stage_name(upstream))
    outputs = up_def.outputs if up_def else {}
    chosen = input_output(spec, name)
    candidates = [chosen] if chosen else [o for o, t in outputs.items() if t == type_]
    where = ("stages", sid, "inputs", name)
    if len(candidates) != 1 or candidates[0] not in outputs:
        listed = ", ".join(f"{o} ({t})" for o, t in outputs.items())
        raise SpecError(
            [study.issue(where, f"cannot pick an output of stage {upstream!r} of type {type_!r}; its outputs: {listed}")]
        )
    if outputs[candidates[0]] != type_:
        raise SpecError(
            [
                study.issue(
                    where, f"output {candidates[0]!r} of {upstream!r} has type {outputs[candidates[0]]!r}, input needs {type_!r}"
                )
            ]
        )
    return upstream, candidates[0]


def _index(upstream_jobs: list[Job], matrix: Mapping[str, list[Any]]) -> dict[str, list[Job]]:
    """Upstream jobs grouped by their values on the axes shared with the downstream matrix."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in upstream_jobs:
        for point in (job.point, *job.also_at):
            group = groups[_shared_key(point, point.keys() & matrix.keys())]
            if not group or group[-1] is not job:
                group.append(job)
    return groups


def _shared_key(point: Point, axes: Any) -> str:
    return canonical_json({a: point[a] for a in sorted(axes)})


def _bind(
    study: Study,
    sid: str,
    name: str,
    many: bool,
    wiring: tuple[str, str] | None,
    index: dict[str, list[Job]],
    point: Point,
    type_: str,
) -> Binding:
    up_sid, output = wiring or ("", "")
    sample = next(iter(index.values()), [])
    shared = (sample[0].point.keys() & point.keys()) if sample else set()
    matches = index.get(_shared_key(point, shared), [])
    if not matches or (not many and len(matches) != 1):
        raise SpecError([study.issue(("stages", sid, "inputs", name), _match_problem(up_sid, len(matches), point, sample))])
    return Binding(name, type_, many, tuple(Upstream(j.key, output, j.point) for j in matches))


def _match_problem(up_sid: str, n: int, point: Point, sample: list[Job]) -> str:
    at = f" at {job_label('', point)}" if point else ""
    if n == 0:
        return f"no job of stage {up_sid!r} matches{at}: shared matrix axes have no common values"
    extra = sorted(set(sample[0].point) - set(point)) if sample else []
    return (
        f"{n} jobs of stage {up_sid!r} match{at} (they differ in {', '.join(extra)}); "
        f"add {', '.join(extra)} to this stage's matrix, or use a stage whose input gathers many"
    )


def _params(study: Study, model: type[BaseModel], params: Mapping[str, Any], point: Point, sid: str) -> dict[str, Any]:
    try:
        return model.model_validate(dict(params)).model_dump(mode="json")
    except ValidationError as e:
        at = f" at {job_label(sid, point)}" if point else ""
        raise SpecError([study.issue(("stages", sid, "params"), f"invalid{at}: {e}")]) from None


def job_key(sid: str, stage_def: StageDef, params: Mapping[str, Any], seed: int, inputs: tuple[Binding, ...]) -> str:
    """The job's content key: sha256 of everything that determines its outputs."""
    payload = {
        "stage_id": sid,
        "stage": stage_def.name,
        "version": stage_def.version,
        "params": params,
        "seed": seed,
        "inputs": {b.name: [[u.job_key, u.output] for u in b.upstream] for b in inputs},
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def job_label(sid: str, point: Point) -> str:
    if not point:
        return sid
    return f"{sid}[{','.join(f'{k}={point_text(v)}' for k, v in point.items())}]"


UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def artifact_name(study: str, sid: str, output: str, point: Point) -> str:
    """``study.stage.output[.axis-value...]`` in characters W&B accepts; long or lossy names get a hash."""
    parts = [study, sid, output, *(f"{k}-{point_text(v)}" for k, v in point.items())]
    raw = ".".join(parts)
    name = UNSAFE.sub("_", raw)
    if name != raw or len(name) > 120:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[:111]}.{digest}"
    return name
