"""Sweeps: W&B's config format validated by its schema, expanded into shared-upstream matrices."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import TOY_SPEC

from orchestrator.errors import SpecError
from orchestrator.executors import LocalExecutor
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan, build_plan
from orchestrator.runner import open_store
from orchestrator.spec import load_study
from orchestrator.sweep import sample


def spec_with(tmp_path: Path, sweep: str, extra_stages: str = "") -> Path:
    text = TOY_SPEC.replace("stage_package:", extra_stages + "stage_package:") + sweep
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def plan_of(path: Path) -> Plan:
    study, registry = load_study(path)
    return build_plan(study, registry)


GRID = """\
sweep:
  method: grid
  metric: {name: value, goal: maximize}
  parameters:
    scale.factor: {values: [2, 3]}
"""


def test_grid_sweep_shares_upstream_and_carries_the_axis_downstream(tmp_path: Path) -> None:
    plan = plan_of(spec_with(tmp_path, GRID))
    labels = [j.label for j in plan.jobs]
    assert labels[:3] == ["emit[language=en]", "emit[language=de]", "emit[language=fr]"]  # once, shared
    assert "scale[language=de,factor=3]" in labels and len(plan.stage_jobs("scale")) == 6
    totals = plan.stage_jobs("total")
    assert [j.label for j in totals] == ["total[factor=2]", "total[factor=3]"]
    for job in totals:  # each total gathers its own factor's three languages
        points = [u.point for u in job.inputs[0].upstream]
        assert len(points) == 3 and {p["factor"] for p in points} == {job.point["factor"]}
    scale = next(j for j in plan.jobs if j.label == "scale[language=de,factor=3]")
    assert scale.params["factor"] == 3.0


def test_collect_gathers_every_sweep_point(tmp_path: Path) -> None:
    summary = "  summary:\n    stage: total\n    collect: [factor]\n    inputs: {numbers: scale}\n"
    plan = plan_of(spec_with(tmp_path, GRID, summary))
    (job,) = plan.stage_jobs("summary")
    assert job.label == "summary" and len(job.inputs[0].upstream) == 6


def test_random_sweep_is_seeded_and_deduplicates_identical_jobs(tmp_path: Path) -> None:
    spec = spec_with(
        tmp_path,
        """\
sweep:
  method: random
  run_cap: 6
  parameters:
    emit.sleep_s: {values: [0.0, 0.01]}
    scale.factor: {distribution: uniform, min: 1.0, max: 2.0}
""",
    )
    plan = plan_of(spec)
    assert plan_of(spec).by_key.keys() == plan.by_key.keys()  # same seed, same points
    emits = plan.stage_jobs("emit")
    assert len(emits) == 6  # 3 languages x 2 distinct values: six points collapse onto them
    assert sum(len(j.also_at) for j in emits) == 6 * 3 - 6
    scales = plan.stage_jobs("scale")
    assert len(scales) == 18 and len({j.params["factor"] for j in scales}) == 6
    for job in scales:  # each scale job reads the emit job of its own point
        (up,) = job.inputs[0].upstream
        emit = plan.by_key[up.job_key]
        assert job.point["sweep"] in {p["sweep"] for p in (emit.point, *emit.also_at)}
    assert [j.label for j in plan.stage_jobs("total")] == [f"total[sweep=p00{i}]" for i in range(6)]


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        (
            "sweep:\n  method: bayes\n  metric: {name: v, goal: minimize}\n  parameters:\n    scale.factor: {values: [1]}\n",
            "sweep.method: bayesian optimisation needs a W&B server",
        ),
        (
            "sweep:\n  method: grid\n  parameters:\n    factor: {values: [1]}\n",
            "sweep.parameters.factor: sweep parameters are named <stage id>.<param>",
        ),
        (
            "sweep:\n  method: grid\n  parameters:\n    scale.factr: {values: [1]}\n",
            "sweep.parameters.scale.factr: stage 'scale' has no parameter 'factr'; parameters: factor, fail, language, seed",
        ),
        (
            "sweep:\n  method: grid\n  parameters:\n    scale.factor: {values: [x]}\n",
            "sweep.parameters.scale.factor: Input should be a valid number",
        ),
        (
            "sweep:\n  method: grid\n  parameters:\n    scale.factor: {valuez: [1]}\n",
            "sweep.parameters.scale.factor: not a valid W&B sweep parameter",
        ),
        ("sweep:\n  method: random\n  parameters:\n    scale.factor: {values: [1]}\n", "sweep: method random needs run_cap"),
        ("sweep:\n  method: grid\n  parameters: {}\n", "sweep.parameters"),
        ("sweep:\n  method: grid\n  parameters:\n    scale.language: {values: [en]}\n", "'language' is also set in stages.scale"),
        ("sweep:\n  methd: grid\n", "sweep"),
    ],
)
def test_bad_sweeps_are_spec_errors(tmp_path: Path, sweep: str, expected: str) -> None:
    with pytest.raises(SpecError) as e:
        load_study(spec_with(tmp_path, sweep))
    assert expected in str(e.value), str(e.value)


def test_collect_of_an_unknown_axis(tmp_path: Path) -> None:
    path = spec_with(tmp_path, GRID, "  t2:\n    stage: total\n    collect: [factr]\n    inputs: {numbers: scale}\n")
    with pytest.raises(SpecError, match=r"stages.t2.collect\[0\]: no sweep axis 'factr'; axes: factor"):
        load_study(path)


def test_distributions() -> None:
    rng = random.Random(0)
    assert sample({"value": 5}, rng) == 5
    assert 1.0 <= sample({"distribution": "uniform", "min": 1.0, "max": 2.0}, rng) <= 2.0
    assert sample({"distribution": "int_uniform", "min": 3, "max": 3}, rng) == 3
    assert sample({"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.5}, rng) in (0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="not supported by the built-in sweep runner"):
        sample({"distribution": "beta", "a": 1, "b": 1}, rng)


def test_grid_sweep_runs_locally_with_upstream_run_once(tmp_path: Path) -> None:
    spec = spec_with(tmp_path, GRID)
    study, registry = load_study(spec)
    plan = build_plan(study, registry)
    root = tmp_path / "root"
    ex = LocalExecutor(StudyPaths(root, study.name), open_store(root), echo=lambda _: None)
    report = ex.submit(plan, spec)
    assert report.ok and len(report.succeeded) == 3 + 6 + 2
    import json

    for job in plan.stage_jobs("total"):
        ref = ex.store.job_outputs(job.key)["total"]
        total = json.loads((ex.store.materialize(ref) / "value.json").read_text())["value"]
        assert total == 3 * 3 * job.point["factor"]


def test_sweep_command_shows_axes_then_submits(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    spec = spec_with(tmp_path, GRID)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec), "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    assert "sweep (grid) of study toy:" in out.stdout
    assert "axis factor: 2 points over scale.factor" in out.stdout
    assert "jobs per stage: emit 3, scale 6, total 2" in out.stdout
    plain = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(tmp_path / "x.yaml")], cwd=tmp_path, capture_output=True, text=True
    )
    assert plain.returncode == 2  # no such file: a spec error
