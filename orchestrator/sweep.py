"""Sweeps in W&B's sweep-config format, run by the orchestrator itself as matrices of jobs.

A study's ``sweep`` section is a W&B sweep config whose parameter names are ``<stage id>.<param>``
(or ``<stage id>.seed``)::

    sweep:
      method: grid                 # grid | random (bayes needs a W&B server)
      metric: {name: heads_kept, goal: maximize}
      parameters:
        prune.threshold: {values: [1.05, 1.1, 1.2]}
        prune.masking_amount: {values: [0.05, 0.1]}

It is validated against W&B's own sweep-config JSON schema (``wandb_sweep_schema.json``, from the
MIT-licensed wandb/sweeps engine 0.3.0; the installed wandb client does not ship one — the server
validates), then expanded into **sweep axes**:

- ``grid``: one axis per parameter, named by the parameter (``threshold``; ``prune.threshold`` if
  two stages share a parameter name), whose values are the parameter's values;
- ``random``: one axis ``sweep`` of ``run_cap`` points (``p000``, ``p001``, ...), each drawing every
  parameter from its distribution with the study's seed.

A sweep axis becomes a matrix axis of the stage it targets **and of every stage downstream of it**
(each threshold gets its own cross-evaluation, statistics and figures), except where a stage lists
the axis in ``collect``: there its ``many`` inputs gather every point (a sweep summary). Stages
upstream of every swept stage are untouched, so their jobs (e.g. training) run once and are shared.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("wandb_sweep_schema.json")
RANDOM_AXIS = "sweep"
SERVER_METHODS = {"bayes": "bayesian optimisation needs a W&B server (wandb online) to suggest points"}


@dataclass(frozen=True, eq=False)  # identity: each plan builds its axes once
class SweepAxis:
    """One axis added to the swept stages' matrices (and carried to their downstream stages)."""

    name: str
    values: tuple[Any, ...]
    targets: tuple[tuple[str, str], ...]  # (stage id, parameter) set by this axis
    table: Mapping[Any, Mapping[tuple[str, str], Any]] = field(default_factory=dict)  # random: point -> values

    def assignments(self, stage_id: str, value: Any) -> dict[str, Any]:
        """The parameters of ``stage_id`` this axis sets at ``value`` (``seed`` included)."""
        if self.table:
            return {param: v for (sid, param), v in self.table[value].items() if sid == stage_id}
        return {param: value for sid, param in self.targets if sid == stage_id}


@cache
def wandb_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def schema_errors(config: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """W&B's sweep-config schema violations as (path inside the sweep section, message)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(wandb_schema())
    out = []
    for err in sorted(validator.iter_errors(dict(config)), key=lambda e: list(map(str, e.absolute_path))):
        out.append((tuple(err.absolute_path), _short(err)))
    return out


def _short(err: Any) -> str:
    if err.validator == "anyOf" and err.absolute_path and err.absolute_path[0] == "parameters":
        return (
            "not a valid W&B sweep parameter: use {values: [...]}, {value: x}, or a distribution such as "
            "{distribution: uniform, min: 1.0, max: 1.3}"
        )
    return str(err.message)


def split_name(name: str) -> tuple[str, str]:
    """``prune.threshold`` -> (``prune``, ``threshold``)."""
    stage_id, _, param = name.partition(".")
    return stage_id, param


def drawn_points(config: Mapping[str, Any]) -> int:
    """How many points ``build_axes`` draws for a random sweep (0 for any other method), without
    drawing them: check it against a cap first, a run_cap of 1e9 would take minutes and gigabytes."""
    cap = config.get("run_cap") if config.get("method") == "random" else None
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not math.isfinite(cap):
        return 0
    return max(int(cap), 0)


def build_axes(config: Mapping[str, Any], seed: int) -> list[SweepAxis]:
    """The sweep axes of a schema-valid config (method grid or random)."""
    params = {name: dict(spec) for name, spec in config["parameters"].items()}
    if config["method"] == "grid":
        return [
            SweepAxis(_axis_name(name, params), tuple(_grid_values(spec)), (split_name(name),)) for name, spec in params.items()
        ]
    rng = random.Random(seed)
    n = int(config["run_cap"])
    points = [f"p{i:03d}" for i in range(n)]
    table = {p: {split_name(name): sample(spec, rng) for name, spec in params.items()} for p in points}
    return [SweepAxis(RANDOM_AXIS, tuple(points), tuple(split_name(n) for n in params), table)]


def _axis_name(name: str, params: Mapping[str, Any]) -> str:
    short = split_name(name)[1]
    clashes = [n for n in params if split_name(n)[1] == short]
    return short if len(clashes) == 1 else name


def _grid_values(spec: Mapping[str, Any]) -> list[Any]:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    raise ValueError("grid search needs 'values' (or a single 'value') for every parameter")


def sample(spec: Mapping[str, Any], rng: random.Random) -> Any:
    """One draw from a W&B parameter spec (the distributions the built-in runner supports)."""
    if "value" in spec:
        return spec["value"]
    dist = spec.get("distribution", "categorical" if "values" in spec else "uniform")
    if dist == "categorical":
        return rng.choice(list(spec["values"]))
    lo, hi = spec.get("min"), spec.get("max")
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "uniform":
        return rng.uniform(float(lo), float(hi))
    if dist == "q_uniform":
        q = float(spec.get("q", 1.0))
        return round(rng.uniform(float(lo), float(hi)) / q) * q
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(float(lo)), math.log(float(hi))))
    if dist == "normal":
        return rng.gauss(float(spec.get("mu", 0.0)), float(spec.get("sigma", 1.0)))
    raise ValueError(
        f"distribution {dist!r} is not supported by the built-in sweep runner; supported: "
        "categorical (values), constant (value), uniform, int_uniform, q_uniform, log_uniform_values, normal"
    )
