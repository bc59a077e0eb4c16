"""``python -m orchestrator prefetch SPEC``: fetch what a study's jobs load by name, ahead of time.

Compute nodes often have no network. Run this where there is network (a login node), with the
caches on the shared filesystem: every stage that declares a ``prefetch`` hook (see
``orchestrator.stage.PrefetchFn``) is called once per distinct parameter set among the plan's jobs
and downloads what such a job loads (models, tokenizers, datasets). The engine does not know what
those are: it only calls the hooks, prints what they report and counts what failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.plan import Plan
from orchestrator.spec import canonical_json
from orchestrator.stage import Registry, StageDef


@dataclass(frozen=True)
class PrefetchTask:
    """One hook call: a stage and a set of parameters, standing for every job that has them."""

    stage: StageDef
    params: Any  # an instance of the stage's params model
    labels: tuple[str, ...]  # the jobs it stands for (the first names the task)

    @property
    def label(self) -> str:
        more = len(self.labels) - 1
        return self.labels[0] + (f" (+{more} jobs with the same parameters)" if more else "")


@dataclass
class PrefetchReport:
    fetched: list[tuple[str, str]] = field(default_factory=list)  # (task label, item)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (task label, error)

    @property
    def ok(self) -> bool:
        return not self.failed


def prefetch_tasks(plan: Plan, registry: Registry) -> tuple[list[PrefetchTask], list[str]]:
    """The hook calls a plan needs, in plan order, one per distinct (stage, params); and the stage
    ids whose stage has no hook (nothing to fetch)."""
    groups: dict[tuple[str, str], list[str]] = {}
    params: dict[tuple[str, str], Any] = {}
    defs: dict[str, StageDef] = {}
    skipped: dict[str, None] = {}
    for job in plan.jobs:
        stage_def = registry.get(job.stage)
        if stage_def is None or stage_def.prefetch is None:
            skipped[job.stage_id] = None
            continue
        key = (job.stage, canonical_json(dict(job.params)))
        if key not in groups:
            params[key] = stage_def.params.model_validate(dict(job.params))
            defs[job.stage] = stage_def
        groups.setdefault(key, []).append(job.label)
    tasks = [PrefetchTask(defs[key[0]], params[key], tuple(labels)) for key, labels in groups.items()]
    return tasks, list(skipped)


def run_prefetch(tasks: list[PrefetchTask], say: Callable[[str], None] = print) -> PrefetchReport:
    """Call every task's hook; print each item as it is fetched. A failing hook is reported and the
    others still run (one missing model should not hide the next)."""
    report = PrefetchReport()
    for i, task in enumerate(tasks, 1):
        hook = task.stage.prefetch
        if hook is None:
            continue
        say(f"[{i}/{len(tasks)}] {task.label}")
        before = len(report.fetched)
        try:
            for item in hook(task.params):
                report.fetched.append((task.label, str(item)))
                say(f"  fetched {item}")
            if len(report.fetched) == before:
                say("  nothing to fetch")
        except Exception as e:  # noqa: BLE001 - a hook is science code: report whatever it raises, go on
            text = (str(e).strip().splitlines() or [""])[0]
            report.failed.append((task.label, f"{type(e).__name__}: {text}" if text else type(e).__name__))
            say(f"  FAILED: {report.failed[-1][1]}")
    return report


def summary(report: PrefetchReport, tasks: list[PrefetchTask], skipped: list[str]) -> str:
    """The closing lines: what was fetched, what has nothing to fetch, what failed and what to do."""
    n = len(report.fetched)
    lines = [f"prefetched {n} item{'' if n == 1 else 's'} for {len(tasks)} distinct stage parameter sets"]
    if skipped:
        lines.append(f"nothing to fetch for: {', '.join(skipped)}")
    for label, error in report.failed:
        lines.append(f"FAILED {label}: {error}")
    if report.failed:
        lines.append(f"{len(report.failed)} failed: fix the above (network, names, credentials) and run prefetch again")
    return "\n".join(lines)


def prefetch(plan: Plan, registry: Registry, say: Callable[[str], None] = print) -> int:
    """The command: 0 when every hook succeeded, 1 otherwise."""
    tasks, skipped = prefetch_tasks(plan, registry)
    say(f"prefetch for study {plan.study.name}: {len(tasks)} hook calls")
    report = run_prefetch(tasks, say)
    say(summary(report, tasks, skipped))
    return 0 if report.ok else 1
