"""Hostile specs: alias bombs, deep nesting, endless ``extends:`` chains, special files, a storage
root that is a file, plans of a billion jobs, names with a trailing newline.

Each one must give exit code 2 and one error naming the file (and the field where there is one),
no traceback, in bounded time and memory: the cases that would eat the machine on a regression run
the real CLI in a subprocess under an address-space limit and a timeout.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from conftest import TOY_SPEC

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.plan import build_plan
from orchestrator.source import MAX_DEPTH, MAX_EXTENDS, MAX_SPEC_BYTES, load_source, resolve_refs
from orchestrator.spec import DEFAULT_MAX_JOBS, load_study

MEMORY_LIMIT = 1536 * 2**20  # bytes of address space for the real CLI: a regression fails, not the machine
TIMEOUT_S = 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def real_cli(args: Sequence[str], cwd: Path) -> tuple[int, str, float]:
    """``python -m orchestrator ARGS`` in ``cwd`` under the memory limit: (exit code, stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        preexec_fn=_limit_memory,  # noqa: PLW1509 - only sets an rlimit, no locks involved
    )
    return proc.returncode, proc.stderr, time.monotonic() - start


def in_process(args: Sequence[str], cwd: Path) -> tuple[int, str]:
    """``orchestrator.cli.main(ARGS)`` run from ``cwd``: (exit code, stderr); a crash reads as a traceback."""
    err = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:  # argparse refusing an option
                rc = e.code if isinstance(e.code, int) else 2
            except BaseException as e:  # noqa: BLE001 - a crash is what these tests look for
                return -1, "Traceback (in-process)\n" + "".join(traceback.format_exception(e))
    finally:
        os.chdir(old)
    return rc, err.getvalue()


def assert_refused(rc: int, stderr: str, *names: str) -> None:
    """Exit 2, no traceback, exactly one error, naming every one of ``names``."""
    assert rc == 2, f"exit {rc}, expected 2\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert "(1 error)" in stderr, f"expected exactly one error:\n{stderr}"
    for name in names:
        assert name in stderr, f"the error does not name {name!r}:\n{stderr}"


def bomb(indent: str = "", levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" YAML mapping: ``width ** levels`` strings from a few hundred bytes."""
    lines = [f"{indent}l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def flow_bomb(levels: int = 9, width: int = 9) -> str:
    return "{" + bomb(levels=levels, width=width).strip().replace("\n", ", ") + "}"


def write(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ alias bombs
@pytest.mark.parametrize(
    ("text", "extra", "where"),
    [
        pytest.param(TOY_SPEC + bomb(), [], "spec.yaml:", id="unknown-top-level-keys"),
        pytest.param(TOY_SPEC + "data:\n  laughs:\n" + bomb("    "), [], "spec.yaml:", id="under-data"),
        pytest.param(TOY_SPEC, ["--set", f"data.laughs={flow_bomb()}"], "--set data.laughs=", id="in-a-set-value"),
    ],
)
def test_alias_bomb_is_refused_in_bounded_memory_and_time(text: str, extra: list[str], where: str, tmp_path: Path) -> None:
    spec = write(tmp_path, text)
    rc, stderr, seconds = real_cli(["validate", str(spec), *extra], tmp_path)
    assert_refused(rc, stderr, where, "aliases", "100,000")
    assert len(stderr) < 1000, f"the error is not one short message:\n{stderr}"
    assert seconds < 10


def test_alias_that_contains_itself_is_refused(tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC + "data:\n  loop: &loop [*loop]\n")
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, str(spec), "cycle")


def test_aliases_within_the_cap_still_work(tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC + "data:\n  base: &base {path: corpus, limit: 10}\n  copy: *base\n")
    study, _ = load_study(spec)
    assert study.data["copy"] == {"path": "corpus", "limit": 10}


# ---------------------------------------------------------------------------- deep nesting
@pytest.mark.parametrize(
    "nested",
    [
        pytest.param("[" * 900 + "]" * 900, id="flow-sequences"),
        pytest.param("{a: " * 900 + "1" + "}" * 900, id="flow-mappings"),
        pytest.param("".join(f"\n{'  ' * (i + 2)}a:" for i in range(900)) + " 1", id="block-mappings"),
    ],
)
def test_deep_nesting_is_refused(nested: str, tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC + f"data:\n  deep: {nested}\n")
    start = time.monotonic()
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, str(spec), f"more than {MAX_DEPTH} levels")
    assert time.monotonic() - start < 10


def test_deep_nesting_in_a_set_value_is_refused(tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC)
    rc, stderr = in_process(["validate", str(spec), "--set", "data.deep=" + "[" * 900 + "]" * 900], tmp_path)
    assert_refused(rc, stderr, "--set data.deep", f"more than {MAX_DEPTH} levels")


def test_nesting_a_spec_may_need_is_fine(tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC + "data:\n  deep: " + "{a: " * 40 + "1" + "}" * 40 + "\n")
    study, _ = load_study(spec)
    assert "deep" in study.data


# ------------------------------------------------------------------------- extends: chains
def test_long_extends_chain_is_refused_naming_the_file(tmp_path: Path) -> None:
    n = 1200
    write(tmp_path, TOY_SPEC, f"s{n}.yaml")
    for i in range(n):
        write(tmp_path, f"extends: s{i + 1}.yaml\n", f"s{i}.yaml")
    rc, stderr = in_process(["validate", str(tmp_path / "s0.yaml")], tmp_path)
    assert_refused(rc, stderr, "extends", f"more than {MAX_EXTENDS}")
    assert f"{tmp_path}{os.sep}s" in stderr


def test_extends_chain_within_the_cap_works(tmp_path: Path) -> None:
    n = MAX_EXTENDS - 1
    write(tmp_path, TOY_SPEC, f"s{n}.yaml")
    for i in range(n):
        write(tmp_path, f"extends: s{i + 1}.yaml\nseed: {i}\n", f"s{i}.yaml")
    study, _ = load_study(tmp_path / "s0.yaml")
    assert study.seed == 0


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "nul"])
def test_extends_of_something_that_is_not_a_regular_file(kind: str, tmp_path: Path) -> None:
    target = {"dev-zero": "/dev/zero", "fifo": "pipe.yaml", "directory": "folder", "nul": "a\\0b.yaml"}[kind]
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "folder").mkdir()
    spec = write(tmp_path, f'extends: "{target}"\n' + TOY_SPEC)
    rc, stderr, seconds = real_cli(["validate", str(spec)], tmp_path)
    expected = "NUL" if kind == "nul" else f"{target}: not a regular file"
    assert_refused(rc, stderr, f"{spec}:1: extends:", expected)
    assert seconds < 10


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_spec_path_that_is_not_a_regular_file(kind: str, tmp_path: Path) -> None:
    path = {"dev-zero": Path("/dev/zero"), "fifo": tmp_path / "pipe.yaml", "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    rc, stderr, _ = real_cli(["validate", str(path)], tmp_path)
    assert_refused(rc, stderr, str(path), "not a regular file")


def test_spec_path_with_a_nul_byte() -> None:
    with pytest.raises(SpecError, match="NUL"):
        load_source(Path("spec\0.yaml"))


def test_spec_file_over_the_size_cap(tmp_path: Path) -> None:
    spec = tmp_path / "huge.yaml"
    with spec.open("w") as f:
        f.write(TOY_SPEC)
        f.write(("# " + "x" * 1021 + "\n") * (MAX_SPEC_BYTES // 1024 + 1))
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, str(spec), "MiB")


# ---------------------------------------------------------------------------- storage.root
@pytest.mark.parametrize("root", ["/dev/null/x", "/etc/passwd", "/dev/null", "a\\0b"])
def test_storage_root_that_cannot_be_a_directory(root: str, tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC + f'storage:\n  root: "{root}"\n')
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, f"{spec}:", "storage.root")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # nothing created


def test_storage_root_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    spec = write(tmp_path, TOY_SPEC + "storage:\n  root: file/store\n")
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, str(spec), "storage.root", "not a directory")


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_store_option_that_is_a_file(command: str, tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC)
    rc, stderr = in_process([command, str(spec), "--store", "/etc/passwd"], tmp_path)
    assert_refused(rc, stderr, "storage.root")


def test_storage_root_that_does_not_exist_yet_is_fine_and_not_created(tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC + "storage:\n  root: new/deeper/store\n")
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert rc == 0, stderr
    assert not (tmp_path / "new").exists()


# -------------------------------------------------------------------------- job-count caps
SWEEP_RANDOM = """\
sweep:
  method: random
  run_cap: {cap}
  parameters:
    scale.factor: {{distribution: uniform, min: 1.0, max: 2.0}}
"""


@pytest.mark.parametrize("cap", ["1e9", "1.0e9", "1.0e+9", "1000000000", ".inf", "200000"])
def test_random_sweep_run_cap_too_large(cap: str, tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC + SWEEP_RANDOM.format(cap=cap))
    rc, stderr, seconds = real_cli(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, str(spec), "sweep.run_cap")
    assert seconds < 10


def test_random_sweep_run_cap_in_a_set_value(tmp_path: Path) -> None:
    spec = write(tmp_path, TOY_SPEC + SWEEP_RANDOM.format(cap=6))
    rc, stderr, _ = real_cli(["validate", str(spec), "--set", "sweep.run_cap=1000000000"], tmp_path)
    assert_refused(rc, stderr, "sweep.run_cap", "--max-jobs N")


def test_a_million_point_matrix_is_refused_before_expanding(tmp_path: Path) -> None:
    hundred = ", ".join(str(v) for v in range(100))
    spec = write(
        tmp_path,
        "name: toy\nlanguages: [en]\nstage_package: toystages\nstages:\n  emit:\n    matrix:\n"
        f"      language: [{', '.join(f'l{v}' for v in range(100))}]\n"
        f"      value: [{hundred}]\n"
        f"      sleep_s: [{hundred}]\n",
    )
    rc, stderr, seconds = real_cli(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, str(spec), "stages.emit.matrix", "1,000,000", "--max-jobs N")
    assert seconds < 10


def test_grid_sweep_over_the_cap_is_refused(tmp_path: Path) -> None:
    values = ", ".join(str(v) for v in range(1, 400))
    sweep = (
        "sweep:\n  method: grid\n  parameters:\n"
        f"    emit.sleep_s: {{values: [{values}]}}\n"
        f"    scale.factor: {{values: [{values}]}}\n"
    )
    spec = write(tmp_path, TOY_SPEC + sweep)  # scale: 3 languages x 399 x 399 points
    rc, stderr, seconds = real_cli(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, str(spec), "sweep.parameters", "scale: 477,603", "--max-jobs N")
    assert seconds < 10


def test_max_jobs_option(toy_spec: Path, tmp_path: Path) -> None:
    rc, stderr = in_process(["validate", str(toy_spec), "--max-jobs", "6"], tmp_path)
    assert_refused(rc, stderr, str(toy_spec), "7 jobs", "--max-jobs N")
    assert in_process(["validate", str(toy_spec), "--max-jobs", "7"], tmp_path)[0] == 0
    assert in_process(["validate", str(toy_spec), "--max-jobs", "0"], tmp_path)[0] == 0  # 0: no limit
    rc, stderr = in_process(["validate", str(toy_spec), "--max-jobs", "-1"], tmp_path)
    assert rc == 2 and "--max-jobs" in stderr and "Traceback" not in stderr


def test_build_plan_max_jobs_parameter(toy_spec: Path) -> None:
    study, registry = load_study(toy_spec)
    with pytest.raises(SpecError, match="7 jobs"):
        build_plan(study, registry, max_jobs=6)
    assert len(build_plan(study, registry, max_jobs=None).jobs) == 7
    assert DEFAULT_MAX_JOBS == 100_000


def test_build_plan_checks_run_cap_before_drawing(tmp_path: Path) -> None:
    """A study changed after validation is still refused by build_plan before a point is drawn."""
    small, registry = load_study(write(tmp_path, TOY_SPEC + SWEEP_RANDOM.format(cap=6)))
    study = small.model_copy(update={"sweep": {**(small.sweep or {}), "run_cap": 10**9}})
    start = time.monotonic()
    with pytest.raises(SpecError, match="run_cap"):
        build_plan(study, registry)
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------ names with a trailing newline
@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("  emit:\n", '  "first\\n":\n    stage: emit\n', "stages"),
        ("name: toy\n", 'name: "toy\\n"\n', "name"),
    ],
)
def test_names_with_a_trailing_newline_are_refused(old: str, new: str, field: str, tmp_path: Path) -> None:
    spec = write(
        tmp_path, TOY_SPEC.replace(old, new).replace("number: emit", 'number: "first\\n"' if "first" in new else "number: emit")
    )
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert rc == 2 and "Traceback" not in stderr, stderr
    assert f"{spec}:" in stderr and field in stderr, stderr


def test_a_reference_with_a_trailing_newline_is_not_a_reference(tmp_path: Path) -> None:
    spec = write(tmp_path, "name: toy\nseed: 3\nstages: {x: {params: {a: '${seed}', b: \"${seed}\\n\"}}}\n")
    source = load_source(spec)
    assert resolve_refs(source, {"seed": 3}, ("stages",)) == []
    assert source.data["stages"]["x"]["params"] == {"a": 3, "b": "${seed}\n"}


def test_yaml_is_parsed_as_before() -> None:
    """The capped loader gives what yaml.safe_load gives (merge keys, anchors, types)."""
    text = "a: &a {x: 1, y: [1, 2.5, null, true, '3']}\nb:\n  <<: *a\n  y: 2\nc: 2001-01-01\n"
    from orchestrator.source import parse_yaml

    assert parse_yaml(text) == yaml.safe_load(text)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("1" + "0" * 5000, id="5001-digit-integer"),
        pytest.param("2001-13-45", id="impossible-date"),
        pytest.param('!!float "x"', id="float-tag-on-text"),
        pytest.param('!!bool "x"', id="bool-tag-on-text"),
    ],
)
def test_yaml_values_python_cannot_build(value: str, tmp_path: Path) -> None:
    """PyYAML raises ValueError or KeyError for these, not a YAML error: still exit 2 naming the line."""
    spec = write(tmp_path, TOY_SPEC + f"data:\n  odd: {{v: {value}}}\n")
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, f"{spec}:19", "invalid YAML")
    plain = write(tmp_path, TOY_SPEC, "plain.yaml")
    rc, stderr = in_process(["validate", str(plain), "--set", f"data.odd={{v: {value}}}"], tmp_path)
    assert_refused(rc, stderr, "--set data.odd", "not valid YAML")


def test_many_references_to_a_large_value_are_refused(tmp_path: Path) -> None:
    """A reference copies what it names: 200 references to 1,000 values would be 200,000 values."""
    refs = "".join("        - ${data.big}\n" for _ in range(200))
    text = TOY_SPEC.replace("      value: 3\n", "      value: 3\n      junk:\n" + refs)
    spec = write(tmp_path, text + f"data:\n  big: {{v: [{', '.join(map(str, range(1000)))}]}}\n")
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, f"{spec}:", "stages.emit.params.junk[", "references copy more than 100,000")


def test_a_thousand_bad_matrix_values_give_one_error(tmp_path: Path) -> None:
    bad = ", ".join(f"x{i}" for i in range(1000))
    spec = write(tmp_path, TOY_SPEC.replace("    params:\n      value: 3\n", f"      value: [{bad}]\n", 1))
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, f"{spec}:", "stages.emit.matrix.value", "999 more values")


def test_a_random_sweep_of_invalid_draws_gives_one_error_quickly(tmp_path: Path) -> None:
    sweep = (
        "sweep:\n  method: random\n  run_cap: 20000\n  parameters:\n    scale.fail: {distribution: uniform, min: 0.1, max: 0.9}\n"
    )
    spec = write(tmp_path, TOY_SPEC + sweep)
    start = time.monotonic()
    rc, stderr = in_process(["validate", str(spec)], tmp_path)
    assert_refused(rc, stderr, f"{spec}:", "sweep.parameters.scale.fail", "19,999 more values")
    assert time.monotonic() - start < 10
