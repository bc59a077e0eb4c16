"""Sweeps run by a W&B server (``sweep SPEC --wandb-agents N``): split, sweep config, agent runs, SLURM.

No W&B server can run here and there is no network, so every W&B client in this file is a FAKE:

- ``FakeSweepWandb`` (in-process): a FAKE ``wandb`` module whose ``sweep()`` returns an id and whose
  ``init()`` returns a FAKE run holding the config values W&B's sweep controller would send; every
  call it records is checked against the REAL wandb 0.31 signatures (``assert_real_api``).
- ``FAKE_WANDB_PACKAGE`` (subprocesses): a FAKE ``wandb`` package put first on PYTHONPATH, recording
  every call as JSON lines; a sweep run's config comes from ``$FAKE_WANDB_CONFIG``.
- ``FAKE_WANDB_CLI``: a FAKE ``wandb`` executable whose ``wandb agent`` runs the sweep's command once
  with the config values of ``$FAKE_AGENT_CONFIGS[$SLURM_ARRAY_TASK_ID]``, as the real agent would.

What only a real server can show (the controller's choice of points, re-issuing preempted runs,
bayes) is listed in the README (Sweeps, W&B server).
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, TESTS, TOY_SPEC
from test_sweep import GRID

from orchestrator import sweeps as ws
from orchestrator.errors import OrchestratorError, SpecError
from orchestrator.executors import LocalExecutor
from orchestrator.executors.slurm import cancel_study
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan, build_plan
from orchestrator.records import read_plan, read_state
from orchestrator.runner import open_store
from orchestrator.spec import Resources, load_study
from orchestrator.sweep import schema_errors
from orchestrator.tracking.wandb import run_id

wandb = pytest.importorskip("wandb")

TRACKED = "tracking: {backend: wandb, project: test, entity: me}\n"
BAYES = """\
sweep:
  method: bayes
  metric: {name: value, goal: maximize}
  parameters:
    scale.factor: {min: 1.5, max: 4.0}
"""


def write_spec(tmp_path: Path, sweep: str = GRID, extra: str = "", tracking: str = TRACKED) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(TOY_SPEC.replace("stage_package:", extra + tracking + "stage_package:") + sweep)
    return path


def labels(jobs: list[Any]) -> list[str]:
    return [j.label for j in jobs]


# ----------------------------------------------------------------------------------- the fakes
class FakeConfig(dict):
    """A FAKE ``wandb.Config``: a dict with wandb's ``update`` signature."""

    def __init__(self, values: dict[str, Any], calls: list[Any]) -> None:
        super().__init__(values)
        self.calls = calls

    def update(self, d: dict[str, Any], allow_val_change: bool | None = None) -> None:  # type: ignore[override]
        self.calls.append(("config.update", (d,), {"allow_val_change": allow_val_change}))
        super().update(d)


class FakeSweepRun:
    """A FAKE ``wandb.Run`` of a sweep: its config holds the values the sweep controller chose."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.calls: list[Any] = []
        self.config = FakeConfig(values, self.calls)

    def mark_preempting(self) -> None:
        self.calls.append(("mark_preempting", (), {}))

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self.calls.append(("log", (data,), {"step": step}))

    def finish(self, exit_code: int | None = None) -> None:
        self.calls.append(("finish", (), {"exit_code": exit_code}))


class FakeSweepWandb:
    """A FAKE ``wandb`` module: ``sweep`` returns an id, ``init`` a FakeSweepRun."""

    def __init__(self, values: dict[str, Any] | None = None, fail_sweep: bool = False) -> None:
        self.values, self.fail_sweep = values or {}, fail_sweep
        self.sweeps: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.inits: list[dict[str, Any]] = []
        self.runs: list[FakeSweepRun] = []

    def sweep(self, *args: Any, **kwargs: Any) -> str:
        self.sweeps.append((args, kwargs))
        if self.fail_sweep:
            raise wandb.errors.CommError("could not reach the W&B server")
        return "abcd1234"

    def init(self, **kwargs: Any) -> FakeSweepRun:
        self.inits.append(kwargs)
        self.runs.append(FakeSweepRun(dict(self.values)))
        return self.runs[-1]


def assert_real_api(fake: FakeSweepWandb) -> None:
    """Every call made on the fake binds to the real wandb 0.31 signature."""
    from wandb.sdk.wandb_config import Config

    for args, kwargs in fake.sweeps:
        inspect.signature(wandb.sweep).bind(*args, **kwargs)
    for kwargs in fake.inits:
        inspect.signature(wandb.init).bind(**kwargs)
    real = {
        "mark_preempting": wandb.Run.mark_preempting,
        "log": wandb.Run.log,
        "finish": wandb.Run.finish,
        "config.update": Config.update,
    }
    for run in fake.runs:
        for name, args, kwargs in run.calls:
            inspect.signature(real[name]).bind(None, *args, **kwargs)


def calls(run: FakeSweepRun, name: str) -> list[Any]:
    return [(a, k) for n, a, k in run.calls if n == name]


FAKE_WANDB_PACKAGE = '''\
"""A FAKE `wandb` package for tests (no W&B server can run here): every call is recorded as a JSON
line in $FAKE_WANDB_LOG. As with the real client, a run started inside a sweep ($WANDB_SWEEP_ID set
by the agent) gets the controller's values as its config: here $FAKE_WANDB_CONFIG."""
import json, os, time

__version__ = "0.31.0+fake"


def _record(event, **fields):
    with open(os.environ["FAKE_WANDB_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **fields}, default=str) + "\\n")


class Settings:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Artifact:
    def __init__(self, name, type, metadata=None):
        self.name, self.type, self.metadata = name, type, metadata or {}

    def add_dir(self, local_path, name=None, policy=None):
        pass

    def add_reference(self, uri, name=None):
        pass


class _Config(dict):
    def update(self, d, allow_val_change=None):
        _record("config.update", keys=sorted(d))
        super().update(d)


class Run:
    def __init__(self, kwargs):
        self.id = kwargs.get("id") or os.environ.get("WANDB_RUN_ID") or "fake"
        self.offline, self.dir = kwargs.get("mode") == "offline", None
        sweep = os.environ.get("WANDB_SWEEP_ID")
        self.config = _Config(json.loads(os.environ.get("FAKE_WANDB_CONFIG", "{}")) if sweep else {})

    def mark_preempting(self):
        _record("mark_preempting", run=self.id)

    def log(self, data, step=None):
        _record("log", run=self.id, data=data)

    def use_artifact(self, artifact_or_name, type=None):
        return Artifact(str(artifact_or_name), type)

    def log_artifact(self, artifact_or_path, aliases=None):
        _record("log_artifact", run=self.id, name=artifact_or_path.name)
        return artifact_or_path

    def finish(self, exit_code=None):
        _record("finish", run=self.id, exit_code=exit_code)


def init(**kwargs):
    _record("init", kwargs={k: v for k, v in kwargs.items() if k != "settings"}, sweep_id=os.environ.get("WANDB_SWEEP_ID"))
    return Run(kwargs)


def sweep(sweep, entity=None, project=None, prior_runs=None):
    _record("sweep", config=sweep, entity=entity, project=project)
    return "fakeswp1"


def teardown(exit_code=None):
    pass
'''

FAKE_WANDB_CLI = '''\
"""A FAKE `wandb` executable (no W&B server can run here): `wandb agent [--count N] [--forward-signals]
SWEEP` runs the sweep's command once, as the real agent does for a run, with WANDB_SWEEP_ID and
WANDB_RUN_ID set and the config values $FAKE_AGENT_CONFIGS[$SLURM_ARRAY_TASK_ID]."""
import json, os, subprocess, sys

import yaml

assert sys.argv[1] == "agent", sys.argv
config = yaml.safe_load(open(os.path.join(os.environ["WANDB_DIR"], "wandb-sweep.yaml")))
command = [c.replace("${program}", config["program"]) for c in config["command"]]
task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
values = json.loads(os.environ["FAKE_AGENT_CONFIGS"])[task]
env = dict(os.environ, WANDB_SWEEP_ID=sys.argv[-1].split("/")[-1], WANDB_RUN_ID=f"fakerun{task}",
           FAKE_WANDB_CONFIG=json.dumps(values))
child = subprocess.Popen(command, env=env)
if "--forward-signals" in sys.argv:  # as the real agent does: pass USR2/TERM on to the run
    import signal
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
while True:
    try:
        sys.exit(child.wait())
    except InterruptedError:
        pass
'''


def fake_package(tmp_path: Path) -> Path:
    folder = tmp_path / "fake-wandb"
    (folder / "wandb").mkdir(parents=True, exist_ok=True)
    (folder / "wandb" / "__init__.py").write_text(FAKE_WANDB_PACKAGE)
    return folder


def fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment that imports the FAKE wandb package and records into tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(fake_package(tmp_path)), str(TESTS), str(ROOT)]),
        FAKE_WANDB_LOG=str(tmp_path / "fake-wandb.jsonl"),
        **extra,
    )
    return env


def fake_events(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "fake-wandb.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


def fake_slurm_bin(tmp_path: Path) -> Path:
    """sbatch, squeue, scancel that only record their arguments (for the checks that SLURM exists),
    and an scontrol that answers with a cluster's limits (so that no real controller is asked)."""
    folder = tmp_path / "fake-slurm"
    folder.mkdir(exist_ok=True)
    for name in ("sbatch", "squeue", "scancel", "wandb", "scontrol"):
        answer = "echo 'MaxArraySize = 1001'; echo 'MaxJobCount = 10000'" if name == "scontrol" else "echo 999"
        script = folder / name
        script.write_text(f'#!/bin/sh\necho {name} "$@" >> {tmp_path / "fake-slurm.log"}\n{answer}\n')
        script.chmod(0o755)
    return folder


# --------------------------------------------------------------------------------------- split
def test_the_plan_splits_into_shared_upstream_and_the_jobs_of_a_point(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, extra="  summary:\n    stage: total\n    collect: [factor]\n    inputs: {numbers: scale}\n")
    prepared = ws.load_sweep(spec)
    split = prepared.split
    assert labels(split.upstream) == ["emit[language=en]", "emit[language=de]", "emit[language=fr]"]
    assert labels(split.swept) == [
        "scale[language=en,factor=2]",
        "scale[language=de,factor=2]",
        "scale[language=fr,factor=2]",
        "total[factor=2]",
    ]  # one (probe) point
    assert labels(split.gathered) == ["summary"]  # gathers every point: not an agent's job
    assert prepared.study.sweep == prepared.config == yaml.safe_load(GRID)["sweep"]
    # the same split of the built-in runner's full grid plan: upstream once, every point swept
    study, registry = load_study(spec)
    full = ws.split_plan(build_plan(study, registry), ws.axis_names(study))
    assert labels(full.upstream) == labels(split.upstream)
    assert [j.key for j in full.upstream] == [j.key for j in split.upstream]
    assert len(full.swept) == 6 + 2 and labels(full.gathered) == ["summary"]


def test_bayes_is_allowed_only_on_the_wandb_path(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, BAYES)
    with pytest.raises(SpecError, match="bayesian optimisation needs a W&B server"):
        load_study(spec)  # the built-in runner still refuses it
    prepared = ws.load_sweep(spec)
    assert prepared.config["method"] == "bayes"
    assert labels(prepared.split.swept)[0] == "scale[language=en,factor=1.5]"  # planned with min


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        (
            BAYES.replace("min: 1.5", "min: 0.5").replace("scale.factor", "scale.fail"),
            "sweep.parameters.scale.fail: Input should be a valid boolean",
        ),
        (BAYES.replace("scale.factor", "scale.factr"), "sweep.parameters.scale.factr: stage 'scale' has no parameter 'factr'"),
        (BAYES.replace("  metric: {name: value, goal: maximize}\n", ""), "method bayes needs a metric"),
        (
            BAYES + "  early_terminate: {type: hyperband, min_iter: 3}\n",
            "sweep.early_terminate: not supported with --wandb-agents",
        ),
        (BAYES + "  program: train.py\n", "sweep.program: set by the orchestrator"),
        (BAYES.replace("bayes", "custom"), "the W&B sweep path runs grid, random, bayes, not custom"),
    ],
)
def test_bad_wandb_sweeps_are_spec_errors_at_the_spec_line(tmp_path: Path, sweep: str, expected: str) -> None:
    spec = write_spec(tmp_path, sweep)
    with pytest.raises(SpecError) as e:
        ws.load_sweep(spec)
    assert expected in str(e.value) and f"{spec}:" in str(e.value) and "--set sweep=" not in str(e.value), str(e.value)


# --------------------------------------------------------------------------------- sweep config
def test_the_wandb_sweep_config_passes_wandbs_schema_and_starts_agent_run(tmp_path: Path) -> None:
    for sweep in (GRID, BAYES):
        prepared = ws.load_sweep(write_spec(tmp_path, sweep))
        frozen = ws.freeze(prepared, tmp_path)
        config = ws.wandb_config(prepared.config, frozen, "toy")
        assert schema_errors(config) == []
        assert config["program"] == str(frozen)
        assert config["command"] == [sys.executable, "-m", "orchestrator", "agent-run", "${program}"]
        assert config["parameters"] == yaml.safe_load(sweep)["sweep"]["parameters"]
        assert config["method"] == yaml.safe_load(sweep)["sweep"]["method"] and config["name"] == "toy"
        data = yaml.safe_load(frozen.read_text())
        assert data["sweep"] == prepared.config and Path(data["storage"]["root"]).is_absolute()
    pinned = ws.flow_yaml(ws.pinned_sweep({"scale.factor": 1e-05, "prune.seed": 2}))
    assert yaml.safe_load(pinned) == {
        "method": "grid",
        "parameters": {"scale.factor": {"value": 1e-05}, "prune.seed": {"value": 2}},
    }


# ------------------------------------------------------------------------------------ agent run
@pytest.fixture
def committed_upstream(tmp_path: Path) -> dict[str, Any]:
    """The toy grid sweep with its shared upstream (emit x3) committed in a real local store, and
    its frozen study. The point's jobs track locally here (job tracking is tested elsewhere)."""
    root = tmp_path / "root"
    spec = write_spec(tmp_path)
    prepared = ws.load_sweep(spec, [f"storage.root={root}", "tracking.backend=local"])
    paths = StudyPaths(root, "toy")
    ex = LocalExecutor(paths, open_store(root), echo=lambda _: None)
    assert ex.submit(Plan(prepared.study, prepared.split.upstream), spec).ok
    folder = tmp_path / "sweep-folder"
    folder.mkdir()
    return {"spec": spec, "root": root, "paths": paths, "frozen": ws.freeze(prepared, folder), "prepared": prepared}


def runs_of(paths: StudyPaths, key: str) -> int:
    return paths.job(key).log.read_text().count(": running stage")


def test_agent_run_runs_only_its_points_jobs_and_reuses_the_committed_upstream(
    committed_upstream: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths: StudyPaths = committed_upstream["paths"]
    for var in ws.SWEEP_ENV:  # what `wandb agent` sets for its run
        monkeypatch.setenv(var, "from-the-agent")
    fake, messages = FakeSweepWandb({"scale.factor": 3, "_wandb": {}}), []
    assert ws.agent_run(committed_upstream["frozen"], wandb=fake, echo=messages.append) == 0
    assert_real_api(fake)
    assert not [v for v in ws.SWEEP_ENV if v in os.environ]  # the point's jobs run as ordinary W&B runs
    # the keys are those of the built-in grid sweep's factor=3 point: one cache, one lineage
    study, registry = load_study(
        committed_upstream["spec"], [f"storage.root={committed_upstream['root']}", "tracking.backend=local"]
    )
    full = build_plan(study, registry)
    point = [j for j in full.jobs if j.point.get("factor") == 3]
    emits = full.stage_jobs("emit")
    store = open_store(committed_upstream["root"])
    for job in point:
        assert store.job_outputs(job.key) is not None and runs_of(paths, job.key) == 1
    assert all(runs_of(paths, j.key) == 1 for j in emits)  # the shared upstream was not run again
    assert all(store.job_outputs(j.key) is None for j in full.jobs if j.point.get("factor") == 2)
    total = next(j for j in point if j.stage_id == "total")
    assert json.loads((store.materialize(store.job_outputs(total.key)["total"]) / "value.json").read_text())["value"] == 27
    [init] = fake.inits
    assert (init["project"], init["entity"], init["group"], init["job_type"]) == ("test", "me", "toy", "sweep-point")
    [run] = fake.runs
    [(args, _)] = calls(run, "log")
    assert args[0]["scale/value"] == 9 and args[0]["total/value"] == 27 and args[0]["value"] == (9 * 3 + 27) / 4
    assert calls(run, "finish") == [((), {"exit_code": 0})] and not calls(run, "mark_preempting")
    [(update, _)] = calls(run, "config.update")
    assert update[0]["orchestrator"]["jobs"][total.label] == total.key
    assert any("--set 'sweep={method: grid, parameters: {scale.factor: {value: 3}}}'" in m for m in messages)
    # a second point (another agent): the study's plan now lists the upstream and both points
    assert ws.agent_run(committed_upstream["frozen"], wandb=FakeSweepWandb({"scale.factor": 2}), echo=messages.append) == 0
    assert all(runs_of(paths, j.key) == 1 for j in emits)
    assert {j["key"] for j in read_plan(paths)["jobs"]} == {j.key for j in full.jobs}
    assert read_state(paths, total.key).state == "succeeded"


def test_agent_run_without_the_committed_upstream_fails_clearly_and_runs_nothing(tmp_path: Path) -> None:
    prepared = ws.load_sweep(write_spec(tmp_path), [f"storage.root={tmp_path / 'empty'}", "tracking.backend=local"])
    frozen = ws.freeze(prepared, tmp_path)
    fake = FakeSweepWandb({"scale.factor": 2})
    with pytest.raises(OrchestratorError, match=r"shared upstream jobs are not committed: emit\[language=en\]"):
        ws.agent_run(frozen, wandb=fake, echo=lambda _: None)
    assert calls(fake.runs[0], "finish") == [((), {"exit_code": 1})]  # W&B records a failed run, not a finished one
    assert not (tmp_path / "empty" / "studies").exists()
    with pytest.raises(OrchestratorError, match="has no value for scale.factor"):
        ws.agent_run(frozen, wandb=FakeSweepWandb({}), echo=lambda _: None)


PREEMPT_SPEC = """\
name: pre
languages: [en]
stage_package: toystages
tracking: {backend: wandb, project: test}
stages:
  count: {params: {sleep_s: 0.1}}
sweep:
  method: grid
  parameters:
    count.steps: {values: [25]}
"""


def test_a_preempted_agent_run_marks_the_run_preempting_first_and_exits_3_then_resumes(tmp_path: Path) -> None:
    """A REAL SIGUSR2 (what the batch shell forwards through `wandb agent --forward-signals` before the
    time limit) to a REAL agent-run process, whose `wandb` is the FAKE package."""
    spec = tmp_path / "pre.yaml"
    spec.write_text(PREEMPT_SPEC)
    root = tmp_path / "root"
    prepared = ws.load_sweep(spec, [f"storage.root={root}"])
    frozen = ws.freeze(prepared, tmp_path)
    [job] = prepared.split.swept
    paths = StudyPaths(root, "pre")
    env = fake_env(
        tmp_path, FAKE_WANDB_CONFIG='{"count.steps": 25}', WANDB_SWEEP_ID="swp", WANDB_RUN_ID="sweeprun", WANDB_API_KEY="fake-key"
    )
    cmd = [sys.executable, "-m", "orchestrator", "agent-run", str(frozen)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while getattr(read_state(paths, job.key), "state", None) != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the count stage is counting
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    events = fake_events(tmp_path)
    sweep_run = [e for e in events if e["event"] == "finish" and e["run"] == "sweeprun"]
    assert [e["exit_code"] for e in sweep_run] == [3]  # preempted: W&B re-issues it, never "finished"
    [mark] = [i for i, e in enumerate(events) if e["event"] == "mark_preempting"]
    job_run = run_id("pre", job.key)
    [job_finish] = [i for i, e in enumerate(events) if e["event"] == "finish" and e["run"] == job_run]
    assert mark < job_finish  # marked before the stage checkpointed and stopped
    assert json.loads((paths.job(job.key).checkpoint / "state.json").read_text())["step"] > 0
    assert "received SIGUSR2: marking the W&B run preempting" in out
    # the re-issued run (a fresh agent after the requeue) resumes the job from its checkpoint
    (tmp_path / "fake-wandb.jsonl").unlink()
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    store = open_store(root)
    value = json.loads((store.materialize(store.job_outputs(job.key)["number"]) / "value.json").read_text())
    assert value == {"value": 25, "starts": 2}
    events = fake_events(tmp_path)
    inits = [e for e in events if e["event"] == "init"]
    assert [("id" in e["kwargs"], e["sweep_id"]) for e in inits] == [(False, "swp"), (True, None)]  # job runs: not sweep runs
    assert inits[1]["kwargs"]["id"] == job_run
    assert [e["data"]["value"] for e in events if e["event"] == "log" and e["run"] == "sweeprun"] == [25]
    assert [e["exit_code"] for e in events if e["event"] == "finish" and e["run"] == "sweeprun"] == [0]


# ---------------------------------------------------------------------------------- the array
def test_the_agent_array_script(tmp_path: Path) -> None:
    prepared = ws.load_sweep(
        write_spec(
            tmp_path,
            extra="executor: {resources: {default: {cpus: 2, time_min: 30}, total: {cpus: 4, mem_gb: 8, partition: gpu}}}\n",
        )
    )
    res = ws.agent_resources(prepared.study, prepared.split.swept)
    assert (res.cpus, res.mem_gb, res.time_min, res.partition) == (4, 8, 4 * 30, None)  # 3 scale + total, summed
    folder = tmp_path / 'it\'s a "dir"'
    script = ws.render_agent_script(
        prepared.study,
        Resources(cpus=4, mem_gb=16, time_min=90, account="proj x"),
        4,
        folder,
        "/opt/my env/bin/wandb",
        "me/test/abcd1234",
        Path("/home/me/work dir"),
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in (
        "#SBATCH --array               0-3",
        "#SBATCH --job-name            toy.wandb-agent",
        "#SBATCH --requeue",
        "#SBATCH --signal              B:USR2@120",
        "#SBATCH --kill-on-invalid-dep yes",
        "#SBATCH --cpus-per-task       4",
        "#SBATCH --mem                 16384M",
        "#SBATCH --time                90",
        "#SBATCH --account             'proj x'",
        "#SBATCH --open-mode           append",
        "cd '/home/me/work dir' || exit 1",
    ):
        assert line in lines, line
    [output] = [ln for ln in lines if ln.startswith("#SBATCH --output")]
    assert output.endswith("%x-%A_%a.out'") and "it'\"'\"'s" in output  # quoted
    assert "'/opt/my env/bin/wandb' agent --count 1 --forward-signals me/test/abcd1234 &" in lines
    assert f"export WANDB_DIR={shlex.quote(str(folder))}" in lines
    assert "trap 'requeue=1; kill -USR2 \"$child\" 2>/dev/null' USR2" in lines
    assert 'scontrol requeue "${SLURM_JOB_ID}"' in script and script.rstrip().endswith('exit "$rc"')
    assert "--dependency" not in script  # given to sbatch at submit time, with the upstream's ids
    out = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


GOLDEN_AGENTS = Path(__file__).parent / "golden" / "wandb_agents.sbatch"


def test_the_agent_script_matches_golden_file(tmp_path: Path) -> None:
    """The agents' batch script byte for byte; its signal loop is the job scripts' (golden/slurm_array.sbatch)."""
    script = ws.render_agent_script(
        ws.load_sweep(write_spec(tmp_path)).study,
        Resources(cpus=4, mem_gb=16, time_min=90, gpus=1, partition="gpu", account="proj x"),
        3,
        Path("/scratch/my study/wandb-sweep/t"),
        "/opt/my env/bin/wandb",
        "me/test/abcd1234",
        Path("/home/me/it's here"),
    )
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_AGENTS.write_text(script)
    assert script == GOLDEN_AGENTS.read_text()


def test_submit_creates_the_sweep_then_queues_upstream_then_agents_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("WANDB_API_KEY", "fake-key")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.chdir(tmp_path)
    spec, root = write_spec(tmp_path), tmp_path / "root"
    sbatch: list[list[str]] = []

    def run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        if cmd[0] == "scontrol":  # the cluster's limits
            return subprocess.CompletedProcess(cmd, 0, "MaxArraySize = 1001\n", "")
        if cmd[0] == "squeue":  # what is queued: all of the ids asked for (-j), pending
            ids = cmd[cmd.index("-j") + 1].split(",") if "-j" in cmd else []
            return subprocess.CompletedProcess(cmd, 0, "".join(f"{i}|PENDING|None\n" for i in ids), "")
        sbatch.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, f"{100 + len(sbatch)}\n", "")

    fake, out = FakeSweepWandb(), []
    assert ws.submit_agents(spec, [f"storage.root={root}"], 2, wandb=fake, run=run, echo=out.append) == 0
    assert_real_api(fake)
    [(args, kwargs)] = fake.sweeps
    assert kwargs == {"entity": "me", "project": "test"} and args[0]["command"][-2:] == ["agent-run", "${program}"]
    [folder] = (root / "studies" / "toy" / ws.SWEEP_DIR).iterdir()
    assert yaml.safe_load((folder / ws.CONFIG_FILE).read_text()) == args[0]
    assert [c[0] for c in sbatch] == ["sbatch", "sbatch"]
    assert sbatch[0][-1].endswith("00-emit.sbatch") and "--dependency" not in " ".join(sbatch[0])
    assert sbatch[1] == ["sbatch", "--parsable", "--dependency=afterok:101", str(folder / ws.SCRIPT_FILE)]
    assert "--forward-signals me/test/abcd1234 &" in (folder / ws.SCRIPT_FILE).read_text()
    record = json.loads((folder / "submission.json").read_text())
    assert [(sub["stage"], sub["id"]) for sub in record["submissions"]] == [("emit", "101"), ("wandb-agent", "102")]
    assert record["wandb_sweep"]["path"] == "me/test/abcd1234"
    assert cancel_study(StudyPaths(root, "toy"), run=run) == ["101", "102"]  # `cancel` stops the agents too
    assert "created W&B sweep me/test/abcd1234" in out and any("array 102 of 2 after 101" in m for m in out)
    # a failing sbatch for the agents cancels the upstream it queued
    sbatch.clear()
    shutil.rmtree(root)

    def failing(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if "agents.sbatch" in cmd[-1]:
            sbatch.append(cmd)
            return subprocess.CompletedProcess(cmd, 1, "", "sbatch: error: Batch job submission failed: Invalid account")
        return run(cmd, **kw)

    with pytest.raises(OrchestratorError, match="Invalid account") as e:
        ws.submit_agents(spec, [f"storage.root={root}"], 2, wandb=fake, run=failing, echo=out.append)
    assert "cancelled the 1 upstream submissions" in str(e.value) and sbatch[-1] == ["scancel", "101"]
    # the W&B server refusing the sweep: nothing is submitted
    sbatch.clear()
    with pytest.raises(OrchestratorError, match="creating the W&B sweep failed.*nothing was submitted"):
        ws.submit_agents(spec, [f"storage.root={root}"], 2, wandb=FakeSweepWandb(fail_sweep=True), run=run, echo=out.append)
    assert sbatch == []


# ----------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    ("tracking", "env", "expected"),
    [
        ("tracking: {backend: local}\n", {"WANDB_API_KEY": "k"}, "needs a W&B server, but tracking.backend is 'local'"),
        (TRACKED, {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "needs W&B online"),
        ("tracking: {backend: wandb, project: test, mode: offline}\n", {"WANDB_API_KEY": "k"}, "tracking.mode is offline"),
        (TRACKED, {}, "needs a W&B API key: set WANDB_API_KEY, or put WANDB_API_KEY=... in a .env file"),
    ],
)
def test_refusals_say_what_to_do_and_submit_nothing(tmp_path: Path, tracking: str, env: dict[str, str], expected: str) -> None:
    spec = write_spec(tmp_path, tracking=tracking)
    out = cli(
        "sweep",
        str(spec),
        "--wandb-agents",
        "2",
        cwd=tmp_path,
        env=fake_env(tmp_path, PATH=f"{fake_slurm_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}", **env),
    )
    assert out.returncode == 1 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / ".orchestrator").exists() and not (tmp_path / "fake-slurm.log").exists()
    assert not [e for e in fake_events(tmp_path) if e["event"] == "sweep"]


def test_a_key_in_dotenv_is_enough(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WANDB_API_KEY=from-dotenv\n")
    bin_ = fake_slurm_bin(tmp_path)
    env = fake_env(tmp_path, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}")
    out = cli("sweep", str(write_spec(tmp_path)), "--wandb-agents", "1", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    [sweep] = [e for e in fake_events(tmp_path) if e["event"] == "sweep"]
    assert (sweep["project"], sweep["entity"]) == ("test", "me")
    assert "from-dotenv" not in "".join(
        p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env"
    )


def test_dry_run_prints_the_config_and_commands_and_contacts_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, BAYES)
    plain = cli("sweep", str(spec), "--dry-run", cwd=tmp_path, env=fake_env(tmp_path))
    assert plain.returncode == 2 and "bayesian optimisation needs a W&B server" in plain.stderr  # built-in: refused
    env = fake_env(tmp_path, PATH=f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin")  # no SLURM here
    out = cli("sweep", str(spec), "--wandb-agents", "3", "--dry-run", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert fake_events(tmp_path) == []  # wandb was not even imported
    text = out.stdout
    assert "W&B sweep (bayes) of study toy, 3 agents:" in text
    assert "shared upstream (run once, before the agents): 3 jobs: emit 3" in text
    assert "per sweep point (one agent run each): 4 jobs: scale 3, total 1" in text
    config = yaml.safe_load(text.split("wandb-sweep.yaml):\n", 1)[1].split("\nnote:", 1)[0])
    assert config["method"] == "bayes" and config["command"][-2:] == ["agent-run", "${program}"]
    assert schema_errors(config) == []
    assert "no W&B API key found" in text
    assert "$ sbatch --parsable /" in text and "00-emit.sbatch" in text
    assert "$ sbatch --parsable '--dependency=afterok:<upstream>' " in text and "agents.sbatch" in text
    assert "#SBATCH --array               0-2" in text and "--forward-signals 'me/test/<sweep-id>' &" in text
    assert not list((tmp_path / ".orchestrator" / "artifacts").glob("jobs/*"))


def test_agent_run_is_a_hidden_command(tmp_path: Path) -> None:
    out = cli("--help", cwd=tmp_path, env=fake_env(tmp_path))
    assert "sweep" in out.stdout and "agent-run" not in out.stdout
    assert "--wandb-agents N" in cli("sweep", "--help", cwd=tmp_path, env=fake_env(tmp_path)).stdout


# ------------------------------------------------------------------------ the real cluster
HAVE_SLURM = shutil.which("sbatch") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0


@pytest.mark.skipif(not HAVE_SLURM, reason="no SLURM cluster here")
def test_real_cluster_runs_the_upstream_once_then_fake_agents_run_their_points(tmp_path: Path) -> None:
    """The REAL local SLURM cluster, with the FAKE `wandb` executable as the agent (it runs the
    sweep's command like the real one) and the FAKE wandb package for the runs."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "wandb").write_text(f"#!{sys.executable}\n{FAKE_WANDB_CLI}")
    (bin_ / "wandb").chmod(0o755)
    spec = write_spec(tmp_path)
    env = fake_env(
        tmp_path,
        PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}",
        WANDB_API_KEY="fake-key",
        FAKE_AGENT_CONFIGS=json.dumps([{"scale.factor": 2}, {"scale.factor": 3}]),
    )
    out = cli("sweep", str(spec), "--wandb-agents", "2", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    [folder] = (tmp_path / ".orchestrator" / "studies" / "toy" / ws.SWEEP_DIR).iterdir()
    ids = [sub["id"] for sub in json.loads((folder / "submission.json").read_text())["submissions"]]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout
        if not queued.strip():
            break
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in folder.glob("*.out"))
    study, registry = load_study(spec)
    store, paths = open_store(tmp_path / ".orchestrator"), StudyPaths((tmp_path / ".orchestrator").resolve(), "toy")
    for job in build_plan(study, registry).jobs:
        assert store.job_outputs(job.key) is not None, (job.label, logs)
        assert runs_of(paths, job.key) == 1, job.label  # emit ran once, in the upstream array
    finishes = [e["exit_code"] for e in fake_events(tmp_path) if e["event"] == "finish" and e["run"].startswith("fakerun")]
    assert sorted(finishes) == [0, 0]


@pytest.mark.skipif(not HAVE_SLURM, reason="no SLURM cluster here")
def test_real_cluster_time_limit_signal_preempts_the_run_and_the_requeued_agent_resumes_it(tmp_path: Path) -> None:
    """What SLURM does 120 s before the time limit (USR2 to the batch shell), on the REAL cluster: the
    shell forwards it to the (FAKE) agent, which forwards it to agent-run as `--forward-signals` does;
    the run is marked preempting and exits 3, the shell requeues the array task, and its fresh agent
    runs the point again, resuming the job from its checkpoint."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "wandb").write_text(f"#!{sys.executable}\n{FAKE_WANDB_CLI}")
    (bin_ / "wandb").chmod(0o755)
    spec = tmp_path / "pre.yaml"
    spec.write_text(PREEMPT_SPEC.replace("sleep_s: 0.1", "sleep_s: 0.2"))
    env = fake_env(
        tmp_path,
        PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}",
        WANDB_API_KEY="fake-key",
        FAKE_AGENT_CONFIGS=json.dumps([{"count.steps": 25}]),
    )
    out = cli("sweep", str(spec), "--wandb-agents", "1", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    [folder] = (tmp_path / ".orchestrator" / "studies" / "pre" / ws.SWEEP_DIR).iterdir()
    agents = json.loads((folder / "submission.json").read_text())["submissions"][-1]["id"]
    study, registry = load_study(spec, ["sweep={method: grid, parameters: {count.steps: {value: 25}}}"])
    [job] = build_plan(study, registry).jobs
    paths = StudyPaths((tmp_path / ".orchestrator").resolve(), "pre")
    deadline = time.monotonic() + 60
    while getattr(read_state(paths, job.key), "state", None) != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    subprocess.run(["scancel", "--signal=USR2", "--batch", f"{agents}_0"], check=True)
    while time.monotonic() < deadline + 60:
        if not subprocess.run(["squeue", "-h", "-j", agents], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in folder.glob("*.out"))
    assert logs.count("sweep point {") == 2 and "received SIGUSR2: marking the W&B run preempting" in logs, logs
    assert "requeueing" in logs and "study pre: 0 cached, 1 succeeded" in logs, logs
    store = open_store(paths.root)
    value = json.loads((store.materialize(store.job_outputs(job.key)["number"]) / "value.json").read_text())
    assert value == {"value": 25, "starts": 2}, logs
    events = fake_events(tmp_path)
    assert len([e for e in events if e["event"] == "mark_preempting"]) == 1
    assert [e["exit_code"] for e in events if e["event"] == "finish" and e["run"] == "fakerun0"] == [3, 0]
