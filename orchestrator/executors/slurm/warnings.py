"""What a SLURM study leaves to the cluster's defaults: warnings for ``validate`` and ``submit``.

Many clusters reject (or silently misplace) jobs without a partition or an account. Neither is an
error here: sbatch takes them from the cluster's defaults or from ``SBATCH_PARTITION`` /
``SBATCH_ACCOUNT`` in the environment, which is why those count as set.
"""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator.plan import Plan
from orchestrator.resources import Resources

# resources field -> the sbatch input environment variable that sets the same option
SBATCH_FIELDS: dict[str, str] = {"partition": "SBATCH_PARTITION", "account": "SBATCH_ACCOUNT"}
MAX_NAMES = 8


def _is_set(res: Resources, name: str) -> bool:
    extra = {k.replace("-", "_"): v for k, v in res.extra.items()}
    return bool(getattr(res, name) or extra.get(name))


def missing_by_field(plan: Plan, environ: Mapping[str, str]) -> dict[str, list[str]]:
    """Per field (partition, account) left unset, the stage ids (or, where only some of a stage's
    jobs lack it, the job labels) that lack it, in plan order."""
    out: dict[str, list[str]] = {}
    executor = plan.study.executor
    for name, env in SBATCH_FIELDS.items():
        if environ.get(env):
            continue
        lacking: dict[str, list[str]] = {}
        totals: dict[str, int] = {}
        for job in plan.jobs:
            totals[job.stage_id] = totals.get(job.stage_id, 0) + 1
            if not _is_set(executor.resources_for(job.stage_id, job.point), name):
                lacking.setdefault(job.stage_id, []).append(job.label)
        names = [sid if len(labels) == totals[sid] else label for sid, labels in lacking.items() for label in labels]
        names = list(dict.fromkeys(names))  # a whole stage once
        if names:
            out[name] = names
    return out


def resource_warnings(plan: Plan, environ: Mapping[str, str]) -> list[str]:
    """One line per field that some job leaves to the cluster's default."""
    stages = list(dict.fromkeys(job.stage_id for job in plan.jobs))
    lines = []
    for name, names in missing_by_field(plan, environ).items():
        more = f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
        who = "any stage" if names == stages else ", ".join(names[:MAX_NAMES]) + more
        lines.append(
            f"warning: no SLURM {name} set for {who}: sbatch uses the cluster's default, which many clusters "
            f"refuse; set executor.resources.default.{name} (or per stage), or export {SBATCH_FIELDS[name]}"
        )
    return lines
