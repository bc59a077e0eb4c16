"""What jobs ask their executor for: ``Resources``, per stage and per matrix point, and the
``executor`` section of a spec that holds them (``ExecutorSpec``).

Keys of ``executor.resources``: ``default`` (every job), a stage id, or a matrix point of a stage,
``<stage>[<axis>=<value>,...]``. A job takes them in that order, later ones winning field by field
(``ExecutorSpec.resources_for``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(Strict):
    """What one job asks the executor for. Units are in the names."""

    cpus: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    gpus: int = Field(0, ge=0)
    time_min: int | None = Field(None, ge=1)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = None
    extra: dict[str, str] = Field(default_factory=dict, description="further sbatch options")
    signal_lead_s: int = Field(
        120, ge=1, description="slurm: seconds before the time limit that USR2 asks the stage to checkpoint"
    )
    max_requeues: int = Field(
        3, ge=0, description="slurm: times a job that checkpointed at its time limit is requeued before it ends as timeout"
    )
    retries: int = Field(0, ge=0, description="times a failed job is run again before it counts as failed")
    retry_backoff_s: float = Field(
        30.0, ge=0, description="wait before the first retry; doubled before each further one"
    )
    processes: int | None = Field(
        None, ge=1, description="processes running the stage together (DDP ranks, one node) per job; default: gpus if > 1, else 1"
    )

    def gpu_count(self) -> int:
        """GPUs per job, asked for with ``gpus`` or with a GPU ``gres`` (``gpu``, ``gpu:2``,
        ``gpu:a100:2``; other generic resources do not count)."""
        if self.gpus:
            return self.gpus
        for item in (self.gres or "").split(","):
            parts = item.strip().split(":")
            if parts[0] == "gpu":
                last = parts[-1].split("(")[0]
                return int(last) if len(parts) > 1 and last.isdigit() else 1
        return 0



SELECTOR_RE = re.compile(r"(?P<stage>[^\[\]]+)\[(?P<point>[^\[\]]*)\]")


def parse_selector(key: str) -> tuple[str, dict[str, str]]:
    """A resources key: ``"prune"`` -> ``("prune", {})``; ``"prune[language=en,seed=2]"`` ->
    ``("prune", {"language": "en", "seed": "2"})``. Raises ValueError for a malformed one."""
    m = SELECTOR_RE.fullmatch(key)
    if m is None:
        if "[" in key or "]" in key:
            raise ValueError(f"{key!r} is not <stage>[<axis>=<value>,...]")
        return key, {}
    pairs: dict[str, str] = {}
    for part in m["point"].split(","):
        axis, eq, value = part.partition("=")
        if not eq or not axis.strip() or not value.strip() or axis.strip() in pairs:
            raise ValueError(f"{key!r}: write the point as <axis>=<value>, each axis once, comma-separated")
        pairs[axis.strip()] = value.strip()
    return m["stage"].strip(), pairs


def point_text(value: Any) -> str:
    """A matrix value as job labels (and resources selectors) write it: strings bare, others as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def selector_matches(pairs: dict[str, str], point: Mapping[str, Any]) -> bool:
    return all(axis in point and point_text(point[axis]) == value for axis, value in pairs.items())


class LocalSettings(Strict):
    """``executor.local``: the local executor's settings."""

    max_parallel: int = Field(2, ge=1, description="jobs running at once")


class SlurmSettings(Strict):
    """``executor.slurm``: the SLURM executor's settings."""

    template: Path | None = Field(None, description="your own sbatch template")
    array_parallelism: int | None = Field(None, ge=1, description="tasks of one job array running at once (--array=...%N)")
    sbatch_timeout_s: float = Field(
        120.0, gt=0, description="how long one SLURM command of a submit (sbatch, squeue, scontrol) may take"
    )


# settings that once sat directly under ``executor`` -> the backend section they belong to now
MOVED = {"max_parallel": "local", "template": "slurm", "array_parallelism": "slurm", "sbatch_timeout_s": "slurm"}


class ExecutorSpec(Strict):
    """``executor``: which backend runs the jobs, its settings (one section per backend), and the
    resources every job asks for."""

    backend: str = Field("local", description="an executor backend (orchestrator.executors.registry): local, slurm")
    resources: dict[str, Resources] = Field(
        default_factory=dict,
        description="per stage id, or per matrix point as <stage>[<axis>=<value>,...]; the key 'default' "
        "applies to every stage; a job takes default, then its stage, then each matching point key in order",
    )
    local: LocalSettings = Field(default_factory=LocalSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    _resolved: dict[tuple[str, tuple[str, ...]], Resources] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _moved_settings(cls, data: Any) -> Any:
        """A setting in its old place is an error that says where it lives now."""
        if isinstance(data, dict):
            for name, section in MOVED.items():
                if name in data:
                    raise ValueError(f"executor.{name} is now executor.{section}.{name}: move it under `{section}:`")
        return data

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        from orchestrator.executors.registry import names

        if name not in names():
            raise ValueError(f"no executor backend {name!r}; valid: {', '.join(names())}")
        return name

    @field_validator("resources")
    @classmethod
    def _selectors(cls, resources: dict[str, Resources]) -> dict[str, Resources]:
        for key in resources:
            parse_selector(key)
        return resources

    def resources_for(self, stage_id: str, point: Mapping[str, Any] | None = None) -> Resources:
        """A job's resources: ``default``, then its stage's, then every ``<stage>[...]`` key that
        matches its matrix ``point``, in the spec's order (later keys win field by field). Do not
        modify the result: it is shared by every job with the same keys (thousands in a plan)."""
        selectors = [(key, pairs) for key in self.resources for sid, pairs in [parse_selector(key)] if pairs and sid == stage_id]
        matched = tuple(key for key, pairs in selectors if point is not None and selector_matches(pairs, point))
        cached = self._resolved.get((stage_id, matched))
        if cached is not None:
            return cached
        base: dict[str, Any] = {}
        for key in ("default", stage_id, *matched):
            if key in self.resources:
                base.update(self.resources[key].model_dump(exclude_unset=True))
        resolved = self._resolved[(stage_id, matched)] = Resources.model_validate(base)
        return resolved
