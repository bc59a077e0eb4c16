"""Plan expansion and job keys: deterministic, and a change reaches exactly its downstream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TESTS, TOY_SPEC

from orchestrator.errors import SpecError
from orchestrator.plan import Plan, artifact_name, build_plan, job_label
from orchestrator.spec import load_study


def plan_of(path: Path, *overrides: str) -> Plan:
    study, registry = load_study(path, overrides)
    return build_plan(study, registry)


def keys(plan: Plan) -> dict[str, str]:
    return {job.label: job.key for job in plan.jobs}


def test_expansion_and_dependencies(toy_spec: Path) -> None:
    plan = plan_of(toy_spec)
    labels = [job.label for job in plan.jobs]
    assert labels == [
        "emit[language=en]",
        "emit[language=de]",
        "emit[language=fr]",
        "scale[language=en]",
        "scale[language=de]",
        "scale[language=fr]",
        "total",
    ]
    by_label = {job.label: job for job in plan.jobs}
    scale_de = by_label["scale[language=de]"]
    assert [plan.by_key[d].label for d in scale_de.deps] == ["emit[language=de]"]
    assert scale_de.params == {"factor": 2.0, "language": "de", "fail": False}
    total = by_label["total"]
    (binding,) = total.inputs
    assert binding.many and [u.point["language"] for u in binding.upstream] == ["en", "de", "fr"]
    assert by_label["emit[language=fr]"].outputs[0].artifact == "toy.emit.number.language-fr"
    position = {job.key: i for i, job in enumerate(plan.jobs)}
    assert all(position[d] < position[job.key] for job in plan.jobs for d in job.deps)


def test_keys_are_stable_across_processes(toy_spec: Path) -> None:
    """Same spec -> same keys in a fresh interpreter (no dict-order or hash-seed dependence)."""
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[2], sys.argv[3]]\n"
        "from orchestrator.spec import load_study; from orchestrator.plan import build_plan\n"
        "s, r = load_study(__import__('pathlib').Path(sys.argv[1]))\n"
        "print(json.dumps({j.label: j.key for j in build_plan(s, r).jobs}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(toy_spec), str(TESTS), str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert json.loads(out.stdout) == keys(plan_of(toy_spec))


def test_changing_one_parameter_changes_that_job_and_downstream_only(toy_spec: Path) -> None:
    base = keys(plan_of(toy_spec))
    changed = keys(plan_of(toy_spec, "stages.scale.params.factor=3"))
    differ = {label for label in base if base[label] != changed[label]}
    assert differ == {"scale[language=en]", "scale[language=de]", "scale[language=fr]", "total"}


def test_changing_one_matrix_point_changes_its_branch_only(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(TOY_SPEC.replace("    params:\n      value: 3\n", "    params:\n      value: 3\n    seed: 5\n"))
    base = keys(plan_of(spec))
    assert base == keys(plan_of(spec))
    assert keys(plan_of(spec, "stages.emit.seed=6")).keys() == base.keys()
    assert all(a != b for a, b in zip(keys(plan_of(spec, "stages.emit.seed=6")).values(), base.values(), strict=True))
    unchanged = keys(plan_of(spec, "stages.total.params.label=other"))
    assert {lbl for lbl in base if base[lbl] != unchanged[lbl]} == {"total"}


def test_irrelevant_changes_do_not_change_keys(toy_spec: Path) -> None:
    base = keys(plan_of(toy_spec))
    assert keys(plan_of(toy_spec, "executor.local.max_parallel=7", "description=hello", "storage.root=/elsewhere")) == base
    # spelling a default explicitly is the same job
    assert keys(plan_of(toy_spec, "stages.scale.params.factor=2.0")) == base


def test_seed_matrix_and_gathering_by_shared_axes(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("""\
name: sweep
languages: [en, de]
stage_package: toystages
stages:
  emit:
    matrix: {language: "${languages}", seed: [1, 2]}
  scale:
    matrix: {language: "${languages}", seed: [1, 2], factor: [1.5, 3]}
    inputs: {number: emit}
  total:
    matrix: {seed: [1, 2]}
    inputs: {numbers: scale}
""")
    plan = plan_of(spec)
    assert len(plan.stage_jobs("emit")) == 4 and len(plan.stage_jobs("scale")) == 8
    for job in plan.stage_jobs("scale"):
        (up,) = job.inputs[0].upstream
        assert up.point == {"language": job.point["language"], "seed": job.point["seed"]}
        assert job.seed == job.point["seed"]
    for job in plan.stage_jobs("total"):
        points = [u.point for u in job.inputs[0].upstream]
        assert len(points) == 4 and {p["seed"] for p in points} == {job.point["seed"]}
    assert len({job.key for job in plan.jobs}) == len(plan.jobs)


def test_single_input_matching_many_jobs_is_a_spec_error(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(TOY_SPEC.replace("  scale:\n    matrix:\n      language: ${languages}\n", "  scale:\n"))
    with pytest.raises(SpecError) as e:
        plan_of(spec)
    assert "s.yaml:11: stages.scale.inputs.number: 3 jobs of stage 'emit' match (they differ in language)" in str(e.value)


def test_cycle_is_a_spec_error(tmp_path: Path) -> None:
    spec = tmp_path / "c.yaml"
    spec.write_text("""\
name: cyc
languages: [en]
stage_package: toystages
stages:
  a: {stage: scale, inputs: {number: c}}
  b: {stage: scale, inputs: {number: a}}
  c: {stage: scale, inputs: {number: b}}
""")
    with pytest.raises(SpecError) as e:
        plan_of(spec)
    assert "c.yaml:4: stages: the stages' inputs form a cycle: a -> b -> c -> a" in str(e.value)


def test_unconnected_input_is_a_spec_error(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\nlanguages: [en]\nstage_package: toystages\nstages:\n  scale: {}\n")
    with pytest.raises(SpecError) as e:
        plan_of(spec)
    assert "input 'number' is not connected" in str(e.value)


def test_downstream_closure(toy_spec: Path) -> None:
    plan = plan_of(toy_spec)
    k = keys(plan)
    assert plan.downstream({k["emit[language=de]"]}) == {k["scale[language=de]"], k["total"]}
    assert plan.downstream({k["total"]}) == set()


def test_names_and_labels() -> None:
    assert job_label("prune", {"language": "en", "threshold": 1.1}) == "prune[language=en,threshold=1.1]"
    assert (
        artifact_name("demo", "prune", "mask", {"language": "en", "threshold": 1.1})
        == "demo.prune.mask.language-en.threshold-1.1"
    )
    odd = artifact_name("demo", "prune", "mask", {"path": "a/b c"})
    assert odd.startswith("demo.prune.mask.path-a_b_c.") and odd != artifact_name("demo", "prune", "mask", {"path": "a_b_c"})
    assert len(artifact_name("d", "s", "o", {"x": "y" * 500})) <= 120


def test_ten_thousand_jobs_plan(tmp_path: Path) -> None:
    """Large matrices expand correctly (speed itself is measured in bench/, not asserted here)."""
    spec = tmp_path / "big.yaml"
    spec.write_text(f"""\
name: big
languages: [en, de, fr, es, ru, zh, ar, hi, ur, ja]
stage_package: toystages
stages:
  emit:
    matrix: {{language: "${{languages}}"}}
  scale:
    matrix: {{language: "${{languages}}", factor: {list(range(100))}, seed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}}
    inputs: {{number: emit}}
""")
    plan = plan_of(spec)
    assert len(plan.jobs) == 10 + 10_000
    assert len({j.key for j in plan.jobs}) == len(plan.jobs)
