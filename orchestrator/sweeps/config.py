"""A study whose sweep a W&B server runs: its sweep section checked for that path, planned with a
probe sweep, and the plan split into the shared upstream and the jobs of one point.

W&B's schema and the distribution table are ``orchestrator.sweep``'s (the built-in runner's); what
this module adds is what only the W&B path allows or needs (bayes, no ``early_terminate``, the
values a stage must accept from each distribution) and the pinning of a sweep to one point.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import OrchestratorError, SpecError, SpecIssue
from orchestrator.overrides import apply_overrides
from orchestrator.plan import Job, Plan, build_plan
from orchestrator.source import SpecSource, load_source
from orchestrator.spec import Study, canonical_json, load_study
from orchestrator.stage import Registry
from orchestrator.sweep import DISTRIBUTIONS, schema_issues

WANDB_METHODS = ("grid", "random", "bayes")


@dataclass(frozen=True)
class Split:
    """A plan's jobs by their role in a W&B sweep (each list in plan order)."""

    upstream: list[Job]  # no sweep axis, not downstream of one: run once, before any agent
    swept: list[Job]  # a sweep axis in their point: the jobs of one point (in an agent run)
    gathered: list[Job]  # downstream of swept jobs without their axis (collect): not run by agents


@dataclass
class Prepared:
    study: Study  # its sweep is the spec's W&B config again (the probe only served to plan)
    registry: Registry
    config: dict[str, Any]  # the spec's sweep section, as written (+ overrides)
    plan: Plan  # planned with the probe sweep: one point
    split: Split


def split_plan(plan: Plan, axis_names: set[str]) -> Split:
    swept = [job for job in plan.jobs if axis_names & set(job.point)]
    below = plan.downstream({job.key for job in swept})
    swept_keys = {job.key for job in swept}
    upstream = [job for job in plan.jobs if job.key not in swept_keys and job.key not in below]
    gathered = [job for job in plan.jobs if job.key in below and job.key not in swept_keys]
    return Split(upstream, swept, gathered)


def axis_names(study: Study) -> set[str]:
    return {axis.name for axis in study.sweep_axes()}


def flow_yaml(value: Any) -> str:
    """``value`` as one line of YAML that ``yaml.safe_load`` (hence ``--set``) reads back equal."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, sort_keys=False).strip()
    if yaml.safe_load(text) != value:
        raise OrchestratorError(f"cannot write {value!r} as a --set value")
    return text


def pinned_sweep(values: Mapping[str, Any]) -> dict[str, Any]:
    """A grid sweep of exactly one point: how an agent run plans the point W&B chose."""
    return {"method": "grid", "parameters": {name: {"value": v} for name, v in values.items()}}


def candidates(spec: Mapping[str, Any]) -> list[Any]:
    """Values of a W&B parameter spec that the stage must accept: every listed value, or the ends
    (or centre) of a distribution (W&B's default for integer bounds: int_uniform). The first one
    stands for the parameter when planning."""
    if "value" in spec:
        out = [spec["value"]]
    elif "values" in spec:
        out = list(spec["values"])
    else:
        lo, hi = spec.get("min"), spec.get("max")
        dist = spec.get("distribution") or ("int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"distribution {dist!r} is not known to the W&B sweep path")
        out = DISTRIBUTIONS[dist].ends(spec)
    return list({canonical_json(v): v for v in out}.values())


def check_config(config: Any, source: SpecSource) -> list[SpecIssue]:
    """W&B's schema, then what this path needs (on top of what the stages need, checked later)."""
    if not isinstance(config, dict):
        return [source.issue(("sweep",), "must be a W&B sweep config (a mapping)")]
    issues = schema_issues(config, source)
    if issues:
        return issues
    method = config["method"]
    if method not in WANDB_METHODS:
        issues.append(source.issue(("sweep", "method"), f"the W&B sweep path runs {', '.join(WANDB_METHODS)}, not {method}"))
    if method == "bayes" and "metric" not in config:
        issues.append(source.issue(("sweep",), "method bayes needs a metric: {name: ..., goal: minimize|maximize}"))
    if "early_terminate" in config:
        issues.append(
            source.issue(
                ("sweep", "early_terminate"),
                "not supported with --wandb-agents: W&B stops a run early with SIGTERM, which an agent run "
                "takes for preemption (the run would be re-issued); remove it",
            )
        )
    for key in ("program", "command"):
        if key in config:
            issues.append(source.issue(("sweep", key), "set by the orchestrator (it runs the frozen study); remove it"))
    return issues + [i for name, spec in config["parameters"].items() if (i := _check_param(name, spec, source))]


def _check_param(name: str, spec: Any, source: SpecSource) -> SpecIssue | None:
    if isinstance(spec, dict) and "parameters" in spec:
        return source.issue(("sweep", "parameters", name), "nested parameters are not supported; use <stage>.<param>")
    try:
        candidates(spec)
    except (ValueError, TypeError) as e:
        return source.issue(("sweep", "parameters", name), str(e))
    return None


def load_sweep(spec: Path, overrides: Sequence[str] = ()) -> Prepared:
    """Load a study whose sweep W&B will run (bayes allowed here only), plan it, split the plan."""
    source = apply_overrides(load_source(spec), overrides)
    config = source.data.get("sweep")
    if config is None:
        raise OrchestratorError(f"{spec} has no sweep section; see README (Sweeps) or use submit")
    issues = check_config(config, source)
    if issues:
        raise SpecError(issues)
    params = config["parameters"]
    probe = {"method": "grid", "parameters": {name: {"values": candidates(s)} for name, s in params.items()}}
    try:  # the stages validate every candidate value, exactly as for a built-in sweep
        study, registry = load_study(spec, [*overrides, f"sweep={flow_yaml(probe)}"])
    except SpecError as e:
        raise SpecError([_relocate(issue, source, params) for issue in e.issues]) from None
    study.sweep = pinned_sweep({name: candidates(s)[0] for name, s in params.items()})
    plan = build_plan(study, registry)
    split = split_plan(plan, axis_names(study))
    study.sweep = copy.deepcopy(config)
    return Prepared(study, registry, copy.deepcopy(config), plan, split)


def _relocate(issue: SpecIssue, source: SpecSource, params: Mapping[str, Any]) -> SpecIssue:
    """An issue found in the probe sweep, pointed back at the spec's own sweep section."""
    if not issue.source.startswith("--set sweep="):
        return issue
    name = issue.field.removeprefix("sweep.parameters.")
    loc = ("sweep", "parameters", name) if name in params else ("sweep",)
    return replace(issue, source=source.where(loc))
