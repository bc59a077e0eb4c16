"""How a plan's jobs become sbatch submissions (pure: no SLURM needed): which jobs share an
array, at which array index, and what each submission waits for, so that every job waits for
exactly its own upstream jobs, as under the local executor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.plan import Plan
from orchestrator.resources import Resources


@dataclass(frozen=True)
class Dep:
    """What one sbatch waits for in an earlier sbatch of the same submit (by its position
    ``unit``): all of its tasks, only the ``tasks`` listed, or, with ``corr``, each task on the
    task of the same index there (``aftercorr``)."""

    unit: int
    tasks: tuple[int, ...] = ()  # () and not corr: every task
    corr: bool = False

    def render(self, job_id: str) -> str:
        if self.corr:
            return f"aftercorr:{job_id}"
        return "afterok:" + (":".join(f"{job_id}_{t}" for t in self.tasks) if self.tasks else job_id)

@dataclass(frozen=True)
class Submission:
    """One sbatch: jobs of one stage with the same resources and the same kind of dependencies.
    ``tasks``: (array index, job key); a plain job (not ``array``) has the one index 0."""

    stage_id: str
    tasks: tuple[tuple[int, str], ...]
    deps: tuple[Dep, ...]
    resources: Resources
    array: bool

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for _, key in self.tasks)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(i for i, _ in self.tasks)

def layout(plan: Plan, todo: Sequence[str], max_array_size: int = 1001) -> list[Submission]:
    """Group the jobs to run into sbatch submissions whose dependencies are exactly the local
    executor's: a job waits for its own upstream jobs, so one failed job cancels its dependents
    and nothing else.

    Jobs of a stage share an array when they have the same resources and depend on the same
    upstream tasks, or each on "its own" task of one upstream array: then the job takes that
    task's array index and the array waits with ``aftercorr`` (task i after task i). Where
    several jobs would take one index (a fan-out), each takes it in a further array, or, when
    that makes fewer arrays, the jobs following one task form an array waiting for it. Arrays
    hold at most ``max_array_size`` tasks (SLURM's MaxArraySize bounds the index); a lone job
    is a plain job waiting on the exact tasks it needs.
    """
    todo_set = set(todo)
    where: dict[str, tuple[int, int]] = {}  # job key -> (submission, array index) of jobs placed so far
    subs: list[Submission] = []
    every: list[frozenset[int]] = []  # the array indices of subs[i]
    by_stage: dict[str, list[str]] = {}
    for job in plan.jobs:
        if job.key in todo_set:
            by_stage.setdefault(job.stage_id, []).append(job.key)
    for sid, keys in by_stage.items():
        groups: dict[tuple[str, frozenset[int], tuple[Dep, ...]], list[tuple[int, str]]] = {}
        resources: dict[str, Resources] = {}
        for key in keys:
            job = plan.by_key[key]
            res = plan.study.executor.resources_for(sid, job.point)
            res_id = res.model_dump_json()
            resources[res_id] = res
            upstream: dict[int, set[int]] = {}
            for dep in job.deps:
                if dep in where:
                    unit, index = where[dep]
                    upstream.setdefault(unit, set()).add(index)
            corr, index = _corresponding(subs, upstream)
            fixed = tuple(
                Dep(u, () if tasks == every[u] else tuple(sorted(tasks)))
                for u, tasks in sorted(upstream.items())
                if u not in corr
            )
            groups.setdefault((res_id, corr, fixed), []).append((index, key))
        for (res_id, corr, fixed), members in groups.items():
            for sub in _arrays(sid, members, corr, fixed, resources[res_id], max_array_size):
                subs.append(sub)
                every.append(frozenset(sub.indices))
                where.update((key, (len(subs) - 1, index)) for index, key in sub.tasks)
    return subs

def _corresponding(subs: Sequence[Submission], upstream: dict[int, set[int]]) -> tuple[frozenset[int], int]:
    """The upstream arrays a job can follow task by task (it needs exactly one task of each,
    all at the same index), and that index; (empty, -1) when there is none."""
    single = sorted((u, next(iter(t))) for u, t in upstream.items() if len(t) == 1 and subs[u].array)
    if not single:
        return frozenset(), -1
    index = single[0][1]
    return frozenset(u for u, i in single if i == index), index

def _arrays(
    sid: str, members: list[tuple[int, str]], corr: frozenset[int], fixed: tuple[Dep, ...], res: Resources, max_size: int
) -> list[Submission]:
    """The submissions of one group of a stage's jobs (see ``layout``): ``members`` are
    (index of the upstream task followed, job key), the index -1 where there is none."""
    if not corr:
        return _chunks(sid, [key for _, key in members], fixed, res, max_size)
    following: dict[int, list[str]] = {}
    for index, key in members:
        following.setdefault(index, []).append(key)
    rounds = max(len(keys) for keys in following.values())
    per_task = sum(math.ceil(len(keys) / max_size) for keys in following.values())
    out: list[Submission] = []
    if per_task < rounds:  # a wide fan-out: one array per upstream task, waiting for that task
        for index, keys in following.items():
            out += _chunks(sid, keys, _sorted(fixed + tuple(Dep(u, (index,)) for u in corr)), res, max_size)
        return out
    for n in range(rounds):  # the n-th job following each task goes into the n-th array
        tasks = sorted((index, keys[n]) for index, keys in following.items() if len(keys) > n)
        if len(tasks) == 1:  # a plain job waits on the exact task it follows
            (index, key), = tasks
            out += _chunks(sid, [key], _sorted(fixed + tuple(Dep(u, (index,)) for u in corr)), res, max_size)
        else:
            out.append(Submission(sid, tuple(tasks), _sorted(fixed + tuple(Dep(u, corr=True) for u in corr)), res, array=True))
    return out

def _chunks(sid: str, keys: list[str], deps: tuple[Dep, ...], res: Resources, max_size: int) -> list[Submission]:
    """Arrays of at most ``max_size`` jobs, indexed from 0 (a lone job: a plain job) with the same dependencies."""
    parts = [keys[i : i + max_size] for i in range(0, len(keys), max_size)]
    return [Submission(sid, tuple(enumerate(part)), deps, res, array=len(part) > 1) for part in parts]

def _sorted(deps: tuple[Dep, ...]) -> tuple[Dep, ...]:
    return tuple(sorted(deps, key=lambda d: d.unit))

def waves(subs: Sequence[Submission]) -> list[list[int]]:
    """Submission numbers in waves: each after every submission it waits for (an sbatch needs the
    job ids of its dependencies), the submissions of a wave independent of each other."""
    level: list[int] = []
    for sub in subs:
        level.append(1 + max((level[d.unit] for d in sub.deps), default=-1))
    return [[n for n, lv in enumerate(level) if lv == w] for w in range(max(level, default=-1) + 1)]

def array_spec(indices: Sequence[int], parallelism: int | None = None) -> str:
    """``--array`` value: sorted indices as ranges (``0-4,7,9-10``), with ``%N`` to run at most N at once."""
    parts: list[str] = []
    ordered = sorted(indices)
    start = prev = ordered[0]
    for i in [*ordered[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + (f"%{parallelism}" if parallelism else "")
