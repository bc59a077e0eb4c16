"""Spec validation: every kind of bad input names the file, the field and the line; exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TOY_SPEC

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.spec import load_study


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_study(path, overrides)
    return [str(i) for i in e.value.issues]


def test_valid_toy_spec_loads_with_references_resolved(toy_spec: Path) -> None:
    study, registry = load_study(toy_spec)
    assert study.name == "toy"
    assert study.stages["emit"].matrix == {"language": ["en", "de", "fr"]}
    assert registry.names() == ["chart", "count", "emit", "flaky", "scale", "total"]
    assert study.executor.backend == "local" and study.tracking.backend == "local"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("name: toy", "name: 'bad name!'", "study.yaml:1: name: String should match pattern"),
        (
            "name: toy\n",
            "name: toy\nextra_key: 1\n",
            "study.yaml:2: extra_key: unknown field; valid fields: data, description, executor",
        ),
        ("languages: [en, de, fr]", "languages: []", "study.yaml:2: languages: List should have at least 1 item"),
        ("languages: [en, de, fr]", "languages: [en, en]", "study.yaml:2: languages: Value error, languages repeat"),
        ("      value: 3", "      value: three", "study.yaml:8: stages.emit.params.value: Input should be a valid number"),
        (
            "      value: 3",
            "      valeu: 3",
            "study.yaml:8: stages.emit.params.valeu: unknown field; valid fields: hold_while, ignore_sigterm, language, sleep_s, value",
        ),
        (
            "      number: emit",
            "      number: emitt",
            "study.yaml:13: stages.scale.inputs.number: no stage 'emitt' in this study",
        ),
        (
            "      number: emit",
            "      numbr: emit",
            "stages.scale.inputs.numbr: stage 'scale' has no input 'numbr'; inputs: number",
        ),
        (
            "  total:\n",
            "  total:\n    stage: totl\n",
            "stages.total.stage: no stage named 'totl'; registered stages: chart, count, emit, flaky, scale, total",
        ),
        (
            "      language: ${languages}\n    params:",
            "      language: ${langs}\n    params:",
            "stages.emit.matrix.language: ${langs} refers to nothing; valid references: ${name}, ${languages}",
        ),
        (
            "      language: ${languages}\n    params:",
            "      lang: [en]\n    params:",
            "stages.emit.matrix.lang: not a parameter of stage 'emit'",
        ),
        (
            "      language: ${languages}\n    params:",
            "      language: []\n    params:",
            "stages.emit.matrix: Value error, matrix axis 'language' has no values",
        ),
        (
            "stage_package: toystages",
            "stage_package: no_such_pkg",
            "study.yaml:17: stage_package: cannot import stage package 'no_such_pkg'",
        ),
        (
            "name: toy\n",
            "name: toy\nexecutor: {backend: pbs}\n",
            "study.yaml:2: executor.backend: Value error, no executor backend 'pbs'; valid: local, slurm (got 'pbs')",
        ),
        (
            "name: toy\n",
            "name: toy\nexecutor: {resources: {trian: {cpus: 2}}}\n",
            "executor.resources.trian: no such stage; valid: default, emit, scale, total",
        ),
        (
            "name: toy\n",
            "name: toy\nexecutor: {resources: {default: {cpus: 0}}}\n",
            "executor.resources.default.cpus: Input should be greater than or equal to 1",
        ),
        ("name: toy\n", "name: toy\ntracking: {backend: mlflow}\n", "tracking.backend: Input should be 'local' or 'wandb'"),
        ("name: toy\n", "name: toy\nname: toy2\n", "study.yaml:2: name: given twice (first on line 1)"),
        ("  total:\n", "  total:\n    seed: x\n", "stages.total.seed: Input should be a valid integer"),
    ],
)
def test_bad_spec_names_file_field_and_line(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in TOY_SPEC
    found = errors(write(tmp_path, TOY_SPEC.replace(old, new, 1)))
    assert any(expected in e for e in found), found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = TOY_SPEC.replace("      value: 3", "      value: x").replace("      number: emit", "      number: nope")
    found = errors(write(tmp_path, text))
    assert len(found) == 2, found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed\n", "study.yaml:2: invalid YAML"),
        ("- just\n- a list\n", "study.yaml:1: a spec must be a YAML mapping"),
        ("", "a spec must be a YAML mapping"),
        ("name: x\nlanguages: [en]\n", "stages: required field is missing"),
    ],
)
def test_malformed_documents(tmp_path: Path, text: str, expected: str) -> None:
    found = errors(write(tmp_path, text))
    assert any(expected in e for e in found), found


def test_missing_file(tmp_path: Path) -> None:
    assert errors(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: file not found"]


def test_overrides_are_validated_like_the_file(toy_spec: Path) -> None:
    study, _ = load_study(toy_spec, ["stages.emit.params.value=7.5", "executor.local.max_parallel=4", "languages=[en]"])
    assert study.stages["emit"].params["value"] == 7.5
    assert study.executor.local.max_parallel == 4
    assert study.stages["emit"].matrix["language"] == ["en"]  # ${languages} resolves after overrides
    found = errors(toy_spec, "stages.emit.params.value=abc")
    assert found[0].startswith("--set stages.emit.params.value=abc: stages.emit.params.value: Input should be a valid number")
    assert errors(toy_spec, "novalue") == ["--set novalue: expected FIELD.PATH=VALUE, e.g. executor.backend=slurm"]
    assert "not a mapping" in errors(toy_spec, "name.sub=1")[0]


def test_cli_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, TOY_SPEC.replace("      value: 3", "      value: x"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{path}:8: stages.emit.params.value" in err
    assert "nothing was run or submitted" in err


def test_spec_hash_changes_with_content(toy_spec: Path) -> None:
    a, _ = load_study(toy_spec)
    b, _ = load_study(toy_spec)
    c, _ = load_study(toy_spec, ["stages.emit.params.value=4"])
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


# ------------------------------------------------------------------ per-point resources (issue 14.5)
POINT_RESOURCES = """\
executor:
  resources:
    default: {cpus: 1, time_min: 10}
    emit: {cpus: 2}
    "emit[language=de]": {cpus: 4, mem_gb: 8}
    "emit[language=fr]": {time_min: 30}
"""


def test_resources_per_matrix_point_layer_over_the_stage_and_default(tmp_path: Path) -> None:
    from orchestrator.plan import build_plan
    from orchestrator.records import JobRecord

    study, registry = load_study(write(tmp_path, TOY_SPEC + POINT_RESOURCES))
    plan = build_plan(study, registry)
    got = {
        job.label: JobRecord.from_job(job, plan, tmp_path).resources.model_dump(include={"cpus", "mem_gb", "time_min"})
        for job in plan.jobs
    }
    assert got["emit[language=en]"] == {"cpus": 2, "mem_gb": None, "time_min": 10}
    assert got["emit[language=de]"] == {"cpus": 4, "mem_gb": 8.0, "time_min": 10}
    assert got["emit[language=fr]"] == {"cpus": 2, "mem_gb": None, "time_min": 30}
    assert got["scale[language=de]"] == {"cpus": 1, "mem_gb": None, "time_min": 10}  # the selector names emit only


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("emit[langauge=de]", "executor.resources.emit[langauge=de]: stage 'emit' has no matrix axis 'langauge'; its axes: language"),
        ("emit[language=xx]", "executor.resources.emit[language=xx]: matches no job of stage 'emit'; its points have language: de, en, fr"),
        ("emitt[language=de]", "executor.resources.emitt[language=de]: no such stage; valid: default, emit, scale, total"),
        ("total[language=de]", "executor.resources.total[language=de]: stage 'total' has no matrix axis 'language'; its axes: none"),
        ("emit[language]", "executor.resources: Value error, 'emit[language]': write the point as <axis>=<value>"),
    ],
)
def test_a_resources_point_that_matches_no_job_is_refused(tmp_path: Path, key: str, expected: str) -> None:
    from orchestrator.plan import build_plan

    spec = write(tmp_path, TOY_SPEC + f'executor:\n  resources:\n    "{key}": {{cpus: 2}}\n')
    with pytest.raises(SpecError) as e:
        build_plan(*load_study(spec))
    assert any(expected in str(i) for i in e.value.issues), [str(i) for i in e.value.issues]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({}, 0), ({"gpus": 2}, 2), ({"gres": "gpu"}, 1), ({"gres": "gpu:4"}, 4), ({"gres": "gpu:a100:2"}, 2), ({"gres": "tmpdisk:100,gpu:3"}, 3), ({"gres": "tmpdisk:100"}, 0)],
)
def test_gpus_asked_for_with_gres_count_as_gpus(fields: dict[str, object], expected: int) -> None:
    from orchestrator.spec import Resources

    assert Resources.model_validate(fields).gpu_count() == expected


def test_resources_layer_in_fixed_order_whatever_the_order_of_the_keys(tmp_path: Path) -> None:
    text = TOY_SPEC + 'executor:\n  resources:\n    "emit[language=de]": {cpus: 4}\n    emit: {cpus: 2}\n    default: {cpus: 1, mem_gb: 2}\n'
    study, _ = load_study(write(tmp_path, text))
    assert study.executor.resources_for("emit", {"language": "de"}).model_dump(include={"cpus", "mem_gb"}) == {"cpus": 4, "mem_gb": 2.0}
    assert study.executor.resources_for("emit", {"language": "en"}).cpus == 2
    assert study.executor.resources_for("scale", {"language": "de"}).cpus == 1


@pytest.mark.parametrize(("old", "section"), [("max_parallel: 3", "local"), ("template: my.sbatch", "slurm"), ("sbatch_timeout_s: 5", "slurm")])
def test_a_backend_setting_in_its_old_place_says_where_it_lives_now(tmp_path: Path, old: str, section: str) -> None:
    name = old.split(":")[0]
    issues = errors(write(tmp_path, TOY_SPEC + f"executor: {{{old}}}\n"))
    assert issues == [f"{tmp_path / 'study.yaml'}:18: executor: Value error, executor.{name} is now executor.{section}.{name}: move it under `{section}:`"]
