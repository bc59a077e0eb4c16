"""Reliability: malformed specs never crash or touch the store, a SIGKILLed submit never corrupts
it, and a resubmit after a failure reruns only the failed job and what depends on it.

Spec fuzzing mutates the valid TOY_SPEC (wrong types, unknown keys, missing fields, unresolvable
``${...}`` references, bad matrices) and feeds random text as YAML; every case must give exit
code 2, name the file (and the field where the mutation says which), print no traceback and
create nothing. Most cases run ``orchestrator.cli.main`` in-process for speed, a few the real CLI.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, TOY_SPEC
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toystages import EmitParams, ScaleParams, TotalParams

from orchestrator.cli import main
from orchestrator.executors import LocalExecutor
from orchestrator.paths import StudyPaths
from orchestrator.plan import build_plan
from orchestrator.runner import open_store
from orchestrator.spec import ExecutorSpec, StageSpec, StorageSpec, Study, TrackingSpec, load_study

TOY: dict[str, Any] = yaml.safe_load(TOY_SPEC)

# ------------------------------------------------------------------------------ spec fuzzing
# mappings in which every key must be a known field (unknown keys are errors), with their fields
STRICT = {
    (): set(Study.model_fields),
    ("stages", "emit"): set(StageSpec.model_fields),
    ("stages", "scale"): set(StageSpec.model_fields),
    ("stages", "total"): set(StageSpec.model_fields),
    ("stages", "emit", "params"): set(EmitParams.model_fields),
    ("stages", "scale", "params"): set(ScaleParams.model_fields),
    ("stages", "total", "params"): set(TotalParams.model_fields),
    ("executor",): set(ExecutorSpec.model_fields),
    ("tracking",): set(TrackingSpec.model_fields),
    ("storage",): set(StorageSpec.model_fields),
}

junk = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
not_a_str = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
not_a_number = st.one_of(
    st.text(alphabet="abcxyz ", min_size=1, max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

# (path, strategy of values that are wrong there)
WRONG_TYPES: list[tuple[tuple[str, ...], st.SearchStrategy[Any]]] = [
    (("name",), st.one_of(not_a_str, st.sampled_from(["", "bad name", "a/b", "-x", "x" * 65, "é"]))),
    (
        ("languages",),
        st.one_of(
            st.text(max_size=5),
            st.just([]),
            st.lists(st.integers(), min_size=1, max_size=3),
            st.just(["en", "en"]),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        ),
    ),
    (("seed",), st.one_of(not_a_number, st.floats(allow_nan=False).filter(lambda f: not math.isfinite(f) or f != int(f)))),
    (("stages",), st.one_of(st.just({}), st.just([]), st.text(max_size=5), st.integers(), st.none())),
    (("stages", "emit"), st.one_of(st.text(max_size=5), st.integers(), st.lists(st.integers(), max_size=2))),
    (
        ("stages", "emit", "params"),
        st.one_of(st.text(min_size=1, max_size=5), st.integers(), st.lists(st.integers(), min_size=1)),
    ),
    (("stages", "emit", "params", "value"), not_a_number),
    (
        ("stages", "emit", "matrix"),
        st.one_of(st.text(min_size=1, max_size=5), st.integers(), st.lists(st.integers(), min_size=1)),
    ),
    (
        ("stages", "scale", "inputs"),
        st.one_of(
            st.text(min_size=1, max_size=5),
            st.lists(st.text(), min_size=1),
            st.just({"number": 1}),
            st.just({"number": "no_such_stage"}),
        ),
    ),
    (("stages", "scale", "params", "fail"), st.one_of(st.text(alphabet="qxz", min_size=1), st.lists(st.integers()))),
    (("stages", "total", "seed"), not_a_number),
    (("executor", "local", "max_parallel"), st.one_of(st.integers(max_value=0), not_a_number)),
    (("executor", "backend"), st.one_of(st.sampled_from(["pbs", "lsf", "", "LOCAL"]), not_a_str)),
    (
        ("executor", "resources"),
        st.one_of(
            st.just({"nope": {"cpus": 1}}),
            st.just({"default": {"cpus": 0}}),
            st.just({"default": {"gpus": "x"}}),
            st.just({"emit": {"mem": 4}}),
        ),
    ),
    (("tracking", "backend"), st.one_of(st.sampled_from(["mlflow", "", "none"]), not_a_str)),
    (("storage", "root"), st.one_of(st.integers(), st.lists(st.integers(), min_size=1), st.just({"a": 1}))),
    # importable names without a registry(), or nothing importable (never arbitrary text: importing runs code)
    (("stage_package",), st.one_of(not_a_str, st.sampled_from(["json", "no_such_stage_package", "toystages.nope", "a..b"]))),
]

MISSING: list[tuple[tuple[str, ...], str]] = [
    (("name",), "name"),
    (("languages",), "languages"),
    (("stages",), "stages"),
    (("stages", "emit"), "stages.scale"),  # scale reads emit
    (("stages", "scale"), "stages.total"),  # total reads scale
    (("stages", "scale", "inputs"), "stages.scale"),
    (("stages", "total", "inputs"), "stages.total"),
]

REF_TARGETS = [
    ("stages", "emit", "params", "value"),
    ("stages", "emit", "matrix", "language"),
    ("stages", "scale", "params", "factor"),
    ("stages", "total", "params", "label"),
    ("stages", "total", "seed"),
]
bad_refs = st.one_of(
    st.sampled_from(
        [
            "${nope}",
            "${languages.0}",
            "${data.corpus}",
            "${model.config}",
            "${seed.x}",
            "${name.first}",
            "${stages}",
            "${executor}",
        ]
    ),
    st.from_regex(r"\$\{[a-z_][a-z0-9_]{0,8}\}", fullmatch=True).filter(lambda r: r[2:-1] not in ("name", "languages", "seed")),
)

BAD_MATRICES: list[tuple[tuple[str, ...], Any]] = [
    (("stages", "emit", "matrix"), {"language": []}),  # no values
    (("stages", "emit", "matrix"), {"language": ["en", "en"]}),  # a repeated value
    (("stages", "emit", "matrix"), {"language": "en"}),  # not a list
    (("stages", "emit", "matrix"), {"language": {"en": 1}}),
    (("stages", "emit", "matrix"), {"language": "${languages}", "not_a_param": [1, 2]}),
    (("stages", "emit", "matrix"), {"language": "${languages}", "value": [1, 2]}),  # also in params
    (("stages", "emit", "matrix"), {"language": [1, 2]}),  # wrong type for the parameter
    (("stages", "emit", "matrix"), {"language": "${languages}", "sleep_s": ["slow"]}),
    (("stages", "scale", "matrix"), {"language": ["xx"]}),  # matches no emit job
    (("stages", "scale", "matrix"), {}),  # one scale job would read three emit jobs
    (("stages", "total", "matrix"), {"label": [1, 2]}),
]


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _delete(doc: dict[str, Any], path: tuple[str, ...]) -> None:
    node = doc
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path[:2])


@st.composite
def unknown_key(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    where = draw(st.sampled_from(sorted(STRICT)))
    key = draw(st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in STRICT[where]))
    doc = copy.deepcopy(TOY)
    _set(doc, (*where, key), draw(junk))
    return doc, ".".join((*where, key))


@st.composite
def wrong_type(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    path, values = draw(st.sampled_from(WRONG_TYPES))
    doc = copy.deepcopy(TOY)
    _set(doc, path, draw(values))
    return doc, _where(path)


@st.composite
def missing_field(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    path, expect = draw(st.sampled_from(MISSING))
    doc = copy.deepcopy(TOY)
    _delete(doc, path)
    return doc, expect


@st.composite
def bad_reference(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    path = draw(st.sampled_from(REF_TARGETS))
    doc = copy.deepcopy(TOY)
    _set(doc, path, draw(bad_refs))
    return doc, ".".join(path)


@st.composite
def bad_matrix(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    path, value = draw(st.sampled_from(BAD_MATRICES))
    doc = copy.deepcopy(TOY)
    _set(doc, path, copy.deepcopy(value))
    return doc, _where(path)


malformed = st.one_of(unknown_key(), wrong_type(), missing_field(), bad_reference(), bad_matrix())


@contextlib.contextmanager
def validated(text: str | bytes) -> Iterator[tuple[int, str, Path, Path]]:
    """Write the spec into a fresh folder, run ``validate`` on it from there in-process (so that a
    relative store, the default one included, would be created in it), yield (exit code, stderr,
    spec, folder), then remove the folder."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        spec = folder / "spec.yaml"
        if isinstance(text, bytes):
            spec.write_bytes(text)
        else:
            spec.write_text(text, encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(["validate", str(spec)])  # the default store would be in this folder
                except BaseException as e:  # noqa: BLE001 - a crash is what this test looks for
                    rc, err = -1, io.StringIO("Traceback (in-process)\n" + "".join(traceback.format_exception(e)))
        finally:
            os.chdir(cwd)
        yield rc, err.getvalue(), spec, folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def assert_rejected(rc: int, stderr: str, spec: Path, folder: Path, expect: str | None) -> None:
    assert rc == 2, f"exit {rc}, expected 2\n{spec.read_text(errors='replace')}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert str(spec) in stderr, f"the error does not name the file:\n{stderr}"
    if expect is not None:
        assert expect in stderr, f"the error does not name {expect!r}:\n{spec.read_text()}\n{stderr}"
    leftovers = sorted(p.name for p in folder.iterdir() if p.name != "spec.yaml")
    assert not leftovers, f"validate created {leftovers}"


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FUZZ
@given(malformed)
def test_fuzz_malformed_specs_exit_2_naming_the_field(case: tuple[dict[str, Any], str]) -> None:
    doc, expect = case
    with validated(yaml.safe_dump(doc, sort_keys=False)) as (rc, stderr, spec, folder):
        assert_rejected(rc, stderr, spec, folder, expect)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=100),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
            lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
            max_leaves=20,
        ).map(lambda v: yaml.safe_dump(v)),
    )
)
def test_fuzz_random_yaml_exits_2_naming_the_file(text: str | bytes) -> None:
    with validated(text) as (rc, stderr, spec, folder):
        assert_rejected(rc, stderr, spec, folder, None)


@pytest.mark.parametrize(
    "text",
    [
        "name: [unclosed\n",
        "- just\n- a list\n",
        "\x00\xff",
        "name: toy\nlanguages: [en]\nstages: {nope: {}}\nstage_package: toystages\n",
        TOY_SPEC.replace("value: 3", "value: three"),
        TOY_SPEC.replace("numbers: scale", "numbers: ${nope}"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "submit"])
def test_malformed_specs_through_the_real_cli(text: str, command: str, tmp_path: Path) -> None:
    spec, store = tmp_path / "spec.yaml", tmp_path / "store"
    spec.write_text(text, encoding="utf-8", errors="surrogateescape")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", command, str(spec), "--store", str(store)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_rejected(proc.returncode, proc.stderr, spec, tmp_path, None)
    assert "nothing was run or submitted" in proc.stderr


# Crashes the fuzzer found (tracebacks instead of exit 2 naming the field), fixed since.
@pytest.mark.parametrize("package", ["", ".relative"])
def test_stage_package_that_cannot_be_a_module_name(package: str) -> None:
    doc = copy.deepcopy(TOY)
    doc["stage_package"] = package
    with validated(yaml.safe_dump(doc)) as (rc, stderr, spec, folder):
        assert_rejected(rc, stderr, spec, folder, "stage_package")


@pytest.mark.parametrize("seeds", [["x"], [None], [[1]], [1.5], [True]])
def test_matrix_seed_values_that_are_not_integers(seeds: list[Any]) -> None:
    doc = copy.deepcopy(TOY)
    doc["stages"]["emit"]["matrix"]["seed"] = seeds
    with validated(yaml.safe_dump(doc)) as (rc, stderr, spec, folder):
        assert_rejected(rc, stderr, spec, folder, "stages.emit.matrix")


# ---------------------------------------------------------------------------- crash safety
def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """Freeze the submit (so it starts nothing new), then SIGKILL it and every job's process group."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGSTOP)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        for kill in (os.killpg, os.kill):  # jobs run in their own sessions: kill each job's group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _fsck(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "fsck", "--store", str(root)], capture_output=True, text=True, timeout=60
    )


def _start_submit(spec: Path, root: Path, cwd: Path) -> tuple[subprocess.Popen[str], float]:
    """Start a submit; return it and when its jobs began (its plan.json appeared: prepare is done)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--store", str(root)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    plan = root / "studies" / "toy" / "plan.json"
    deadline = time.monotonic() + 60
    while not plan.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return proc, time.monotonic()


def _check_complete(spec: Path, root: Path) -> None:
    """fsck says ok, then a resubmit completes and the study's result is right."""
    check = _fsck(root)
    assert check.returncode == 0 and "store ok" in check.stdout, check.stdout + check.stderr
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--store", str(root)],
        cwd=root.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    check = _fsck(root)
    assert check.returncode == 0 and "store ok" in check.stdout, check.stdout + check.stderr
    study, registry = load_study(spec, [f"storage.root={root}"])
    plan = build_plan(study, registry)
    store = open_store(root)
    assert all(store.job_outputs(j.key) is not None for j in plan.jobs)
    total = next(j for j in plan.jobs if j.label == "total")
    ref = store.job_outputs(total.key)["total"]
    assert json.loads((store.materialize(ref) / "value.json").read_text())["value"] == 18
    # identical content is one version, also when a killed writer had logged it before
    assert all(len(store.versions(o.artifact)) == 1 for j in plan.jobs for o in j.outputs)


def test_sigkilled_submits_leave_a_clean_store_and_a_resubmit_completes(toy_spec: Path, tmp_path: Path) -> None:
    """SIGKILL a submit and all its job processes at random points while its jobs run (a fresh
    store each time); fsck then finds the store clean and a resubmit completes with total 18."""
    calibrate, _ = _start_submit(toy_spec, tmp_path / "calibration", tmp_path)
    began = time.monotonic()
    assert calibrate.wait(timeout=120) == 0
    window = time.monotonic() - began  # how long the jobs of a whole submit run
    rng = random.Random(8)
    killed_mid_run = 0
    for round_ in range(5):
        root = tmp_path / f"round{round_}"
        proc, began = _start_submit(toy_spec, root, tmp_path)
        time.sleep(max(0.0, began + rng.uniform(0.0, window) - time.monotonic()))
        killed_mid_run += proc.poll() is None
        _kill_tree(proc)
        _check_complete(toy_spec, root)
    assert killed_mid_run >= 3, f"only {killed_mid_run} of 5 kills landed while jobs ran: nothing was tested"


# -------------------------------------------------------------------------- failure semantics
CHAIN_SPEC = """\
name: chain
languages: [en, de, fr]
stage_package: toystages
stages:
  emit:
    matrix: {language: "${languages}"}
    params: {value: 3}
  scale:
    matrix: {language: "${languages}"}
    inputs: {number: emit}
  rescale:
    stage: scale
    matrix: {language: "${languages}"}
    inputs: {number: scale}
  total:
    inputs: {numbers: rescale}
"""


def test_resubmit_after_a_failure_reruns_only_the_failed_job_and_its_dependents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure two stages above the end of a chain: the failed job, its transitive dependents and
    nothing else run again; the jobs that succeeded are neither rerun nor re-versioned."""
    spec = tmp_path / "chain.yaml"
    spec.write_text(CHAIN_SPEC)
    root = tmp_path / "root"
    study, registry = load_study(spec, [f"storage.root={root}"])
    plan = build_plan(study, registry)
    by_label = {j.label: j.key for j in plan.jobs}
    ex = LocalExecutor(StudyPaths(root, study.name), open_store(root), max_parallel=2, echo=lambda s: None)

    monkeypatch.setenv("TOYSTAGES_FAIL", "de")  # scale[language=de] and rescale[language=de] fail
    first = ex.submit(plan, spec)
    labels = lambda keys: sorted(plan.by_key[k].label for k in keys)  # noqa: E731
    assert labels(first.failed) == ["scale[language=de]"]
    assert labels(first.skipped) == ["rescale[language=de]", "total"]
    assert len(first.succeeded) == 7
    records = {k: (root / "artifacts" / "jobs" / f"{k}.json").stat().st_mtime_ns for k in first.succeeded}

    monkeypatch.delenv("TOYSTAGES_FAIL")
    second = ex.submit(plan, spec)
    assert labels(second.succeeded) == ["rescale[language=de]", "scale[language=de]", "total"]
    assert sorted(second.cached) == sorted(first.succeeded) and len(second.cached) == 7
    assert not second.failed and not second.skipped and second.ok
    for key, mtime in records.items():  # untouched: not rerun, not even re-recorded
        assert (root / "artifacts" / "jobs" / f"{key}.json").stat().st_mtime_ns == mtime
    store = ex.store
    ref = store.job_outputs(by_label["total"])["total"]
    assert json.loads((store.materialize(ref) / "value.json").read_text())["value"] == 3 * 2 * 2 * 3
    assert all(len(store.versions(o.artifact)) == 1 for j in plan.jobs for o in j.outputs)

    third = ex.submit(plan, spec)
    assert len(third.cached) == 10 and not third.succeeded


def test_real_cli_failure_then_resubmit_counts(tmp_path: Path) -> None:
    """The same through ``python -m orchestrator submit``: exit 1 naming the log, then exit 0 with
    '7 of 10 jobs cached' and exactly 3 jobs run."""
    spec = tmp_path / "chain.yaml"
    spec.write_text(CHAIN_SPEC)
    cmd = [sys.executable, "-m", "orchestrator", "submit", str(spec), "--store", str(tmp_path / "root")]
    failed = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "TOYSTAGES_FAIL": "fr"}
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAILED  scale[language=fr]" in failed.stdout and "job.log" in failed.stdout
    again = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "TOYSTAGES_FAIL"},
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "7 of 10 jobs cached" in again.stdout
    assert "running 3 jobs" in again.stdout
    assert str(ROOT) not in again.stderr
