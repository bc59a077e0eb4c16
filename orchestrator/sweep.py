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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from orchestrator.errors import SpecIssue
from orchestrator.packaged import sweep_schema
from orchestrator.source import SpecSource

SCHEMA_PATH = sweep_schema()
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


def schema_issues(config: Mapping[str, Any], source: SpecSource) -> list[SpecIssue]:
    """``schema_errors`` as spec issues, each pointing at its line of the spec's sweep section: the
    first check of a sweep section, whichever runner (built-in or W&B agents) will run it."""
    return [source.issue(("sweep", *path), msg) for path, msg in schema_errors(config)]


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
    draw = DISTRIBUTIONS[dist].draw if dist in DISTRIBUTIONS else None
    if draw is None:
        drawn = [name for name, d in DISTRIBUTIONS.items() if d.draw]
        raise ValueError(
            f"distribution {dist!r} is not supported by the built-in sweep runner; supported: "
            + ", ".join(["categorical (values)", "constant (value)", *drawn])
        )
    return draw(spec, rng)


# ------------------------------------------------------------------------- the distribution table
@dataclass(frozen=True)
class Distribution:
    """A W&B parameter distribution as both sweep runners read it. ``ends``: values a stage must
    accept from it (its ends, or its centre), checked before a W&B server draws from it; ``draw``:
    one draw by the built-in runner (None: only a W&B server draws from it). The config check
    (W&B's schema) requires ``min`` and ``max`` where they are read."""

    ends: Callable[[Mapping[str, Any]], list[Any]]
    draw: Callable[[Mapping[str, Any], random.Random], Any] | None = None


def _range(spec: Mapping[str, Any]) -> tuple[float, float]:
    return float(spec["min"]), float(spec["max"])


def _ints(spec: Mapping[str, Any]) -> tuple[int, int]:
    return int(spec["min"]), int(spec["max"])


def _mu(spec: Mapping[str, Any]) -> float:
    return float(spec.get("mu", 0.0))


def _exp_ends(spec: Mapping[str, Any]) -> list[Any]:
    return [math.exp(v) for v in _range(spec)]


def _beta_mean(spec: Mapping[str, Any]) -> list[Any]:
    a, b = float(spec.get("a", 1.0)), float(spec.get("b", 1.0))
    return [a / (a + b)]


def _q_uniform(spec: Mapping[str, Any], rng: random.Random) -> float:
    q = float(spec.get("q", 1.0))
    return round(rng.uniform(*_range(spec)) / q) * q


# The built-in runner draws from the first five, in this order in its error message.
DISTRIBUTIONS: dict[str, Distribution] = {
    "uniform": Distribution(lambda s: list(_range(s)), lambda s, rng: rng.uniform(*_range(s))),
    "int_uniform": Distribution(lambda s: list(_ints(s)), lambda s, rng: rng.randint(*_ints(s))),
    "q_uniform": Distribution(lambda s: list(_range(s)), _q_uniform),
    "log_uniform_values": Distribution(
        lambda s: list(_range(s)), lambda s, rng: math.exp(rng.uniform(*(math.log(v) for v in _range(s))))
    ),
    "normal": Distribution(lambda s: [_mu(s)], lambda s, rng: rng.gauss(_mu(s), float(s.get("sigma", 1.0)))),
    "q_log_uniform_values": Distribution(lambda s: list(_range(s))),
    "inv_log_uniform_values": Distribution(lambda s: list(_range(s))),
    "log_uniform": Distribution(_exp_ends),  # min and max are the logs of the ends
    "q_log_uniform": Distribution(_exp_ends),
    "inv_log_uniform": Distribution(lambda s: [math.exp(-v) for v in reversed(_range(s))]),
    "q_normal": Distribution(lambda s: [_mu(s)]),
    "log_normal": Distribution(lambda s: [math.exp(_mu(s))]),
    "q_log_normal": Distribution(lambda s: [math.exp(_mu(s))]),
    "beta": Distribution(_beta_mean),
    "q_beta": Distribution(_beta_mean),
}
