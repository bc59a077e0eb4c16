"""How the SLURM executor lays a plan out in sbatch submissions (pure: no cluster needed).

The property every layout must have: each job waits for exactly the upstream jobs it depends on
(no more, so one failure cancels only its own dependents; no fewer, so nothing starts early),
read through SLURM's dependency semantics (``afterok`` on an array, on listed tasks, and
``aftercorr``: task i after task i).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TOY_SPEC

from orchestrator.executors.slurm import ClusterLimits, Submission, array_spec, layout, waves
from orchestrator.plan import Plan, build_plan
from orchestrator.spec import load_study


def plan_of(tmp_path: Path, text: str) -> Plan:
    spec = tmp_path / "study.yaml"
    spec.write_text(text)
    return build_plan(*load_study(spec))


def waits_for(subs: list[Submission], n: int, index: int) -> set[tuple[int, int]]:
    """(submission, array index) of every task that task ``index`` of ``subs[n]`` waits for."""
    out: set[tuple[int, int]] = set()
    for dep in subs[n].deps:
        if dep.corr:
            out.add((dep.unit, index))
        else:
            out |= {(dep.unit, t) for t in (dep.tasks or subs[dep.unit].indices)}
    return out


def check_exact(plan: Plan, subs: list[Submission], todo: set[str]) -> None:
    where = {key: (n, i) for n, sub in enumerate(subs) for i, key in sub.tasks}
    assert set(where) == todo and sum(len(s.tasks) for s in subs) == len(todo)  # every job once
    for n, sub in enumerate(subs):
        assert len(set(sub.indices)) == len(sub.indices)
        assert sub.array or sub.indices == (0,)
        for index, key in sub.tasks:
            needed = {where[d] for d in plan.by_key[key].deps if d in todo}
            assert waits_for(subs, n, index) == needed, plan.by_key[key].label
            assert all(u < n for u, _ in needed)  # queued after what it waits for
            for dep in sub.deps:  # an aftercorr partner task exists
                assert not dep.corr or index in subs[dep.unit].indices


CHAIN = TOY_SPEC.replace(
    "  total:\n    inputs:\n      numbers: scale\n",
    "  again:\n    stage: scale\n    matrix:\n      language: ${languages}\n    inputs:\n      number: scale\n"
    "  total:\n    inputs:\n      numbers: again\n",
)
FAN_OUT = TOY_SPEC.replace(
    "  scale:\n    matrix:\n      language: ${languages}\n",
    "  scale:\n    matrix:\n      language: ${languages}\n      factor: [2, 3, 4]\n",
)


def test_a_chain_follows_task_by_task_and_gathers_the_whole_array(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, CHAIN)
    subs = layout(plan, [j.key for j in plan.jobs])
    assert [(s.stage_id, len(s.tasks), s.array) for s in subs] == [
        ("emit", 3, True), ("scale", 3, True), ("again", 3, True), ("total", 1, False)
    ]  # fmt: skip
    assert [[d.render(f"J{d.unit}") for d in s.deps] for s in subs] == [[], ["aftercorr:J0"], ["aftercorr:J1"], ["afterok:J2"]]
    check_exact(plan, subs, {j.key for j in plan.jobs})


def test_a_fan_out_takes_one_array_per_job_that_follows_the_same_task(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, FAN_OUT)
    subs = layout(plan, [j.key for j in plan.jobs])
    assert [(s.stage_id, len(s.tasks)) for s in subs] == [("emit", 3), ("scale", 3), ("scale", 3), ("scale", 3), ("total", 1)]
    assert [d.render("J") for d in subs[-1].deps] == ["afterok:J", "afterok:J", "afterok:J"]
    check_exact(plan, subs, {j.key for j in plan.jobs})


WIDE_FAN_OUT = FAN_OUT.replace("factor: [2, 3, 4]", f"factor: {list(range(2, 12))}")


def test_a_wide_fan_out_takes_one_array_per_upstream_task_when_that_is_fewer_arrays(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, WIDE_FAN_OUT)  # 3 emit tasks, 10 scale jobs following each
    subs = layout(plan, [j.key for j in plan.jobs])
    assert [(s.stage_id, len(s.tasks)) for s in subs] == [("emit", 3), ("scale", 10), ("scale", 10), ("scale", 10), ("total", 1)]
    assert [[d.render("J") for d in s.deps] for s in subs[1:4]] == [["afterok:J_0"], ["afterok:J_1"], ["afterok:J_2"]]
    check_exact(plan, subs, {j.key for j in plan.jobs})


@pytest.mark.parametrize("max_size", [1, 2, 3, 4, 1001])
@pytest.mark.parametrize("spec", [TOY_SPEC, CHAIN, FAN_OUT, WIDE_FAN_OUT], ids=["toy", "chain", "fan-out", "wide-fan-out"])
def test_arrays_split_at_max_array_size_and_dependencies_stay_exact(tmp_path: Path, spec: str, max_size: int) -> None:
    plan = plan_of(tmp_path, spec)
    subs = layout(plan, [j.key for j in plan.jobs], max_size)
    assert all(max(s.indices) < max_size for s in subs)  # SLURM bounds the index, not only the count
    check_exact(plan, subs, {j.key for j in plan.jobs})


def test_only_jobs_to_run_are_laid_out_and_cached_upstream_is_not_waited_for(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, CHAIN)
    todo = {j.key for j in plan.jobs if j.stage_id != "emit" and "de" not in j.label}  # as after a partial failure
    subs = layout(plan, [j.key for j in plan.jobs if j.key in todo])
    check_exact(plan, subs, todo)
    assert subs[0].stage_id == "scale" and subs[0].deps == ()


def test_jobs_with_other_resources_go_to_their_own_array(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, CHAIN + 'executor:\n  resources:\n    "scale[language=de]": {cpus: 2, mem_gb: 4}\n')
    subs = layout(plan, [j.key for j in plan.jobs])
    scale = [s for s in subs if s.stage_id == "scale"]
    assert sorted((len(s.tasks), s.resources.cpus) for s in scale) == [(1, 2), (2, 1)]
    check_exact(plan, subs, {j.key for j in plan.jobs})


def test_array_spec_and_cluster_limits() -> None:
    assert array_spec([0, 1, 2, 3]) == "0-3"
    assert array_spec([4, 0, 1, 7, 9, 10], 2) == "0-1,4,7,9-10%2"
    assert array_spec([5]) == "5"
    config = "MaxArraySize            = 64\nMaxJobCount             = 500\nMaxJobId = 67043328\n"
    assert ClusterLimits.parse(config) == ClusterLimits(max_array_size=64, max_job_count=500)
    assert ClusterLimits.parse("") == ClusterLimits(max_array_size=1001, max_job_count=10_000)  # SLURM's defaults


def test_submissions_are_queued_in_waves_after_what_they_wait_for(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, WIDE_FAN_OUT)
    subs = layout(plan, [j.key for j in plan.jobs])
    assert waves(subs) == [[0], [1, 2, 3], [4]]  # the three scale arrays go to sbatch together
    assert waves([]) == []
