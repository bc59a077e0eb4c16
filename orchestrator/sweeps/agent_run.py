"""``python -m orchestrator agent-run FROZEN_STUDY``: one run of a W&B sweep, started by ``wandb agent``
inside an array task of the agents. It reads the point W&B chose from ``wandb.config``, pins the
study's sweep to it (so keys, labels and artifact names are the built-in runner's for the same
values), runs the point's jobs with the local executor in the agent's allocation (the shared
upstream is cached by key), and reports the point's metrics to the sweep run.

Preemption: on SIGUSR2 (the time limit is near; the batch shell and the agent forward it) or
SIGTERM, the run is marked preempting *before* the jobs are asked to checkpoint, then exits 3: W&B
re-issues the run, and the requeued task's fresh agent resumes the point from its jobs' checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from orchestrator import views
from orchestrator.artifacts import open_store
from orchestrator.artifacts.locking import file_lock
from orchestrator.errors import OrchestratorError
from orchestrator.executors.local import LocalExecutor
from orchestrator.fsutil import atomic_write_json
from orchestrator.paths import StudyPaths
from orchestrator.plan import Job, Plan, build_plan
from orchestrator.records import plan_entry, read_plan, read_state, write_plan, write_state
from orchestrator.runner import EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from orchestrator.spec import canonical_json, load_study
from orchestrator.sweeps.config import axis_names, flow_yaml, pinned_sweep, split_plan
from orchestrator.tracking.wandb import import_wandb, load_api_key

# set by `wandb agent` for its run; the point's jobs must not see them, or wandb.init in a job would
# take the job's own run for the sweep run (wandb ignores the run id it is given inside a sweep)
SWEEP_ENV = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class _Preemption:
    """SIGUSR2/SIGTERM in an agent run: mark the W&B run preempting first, then stop the jobs."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.signal: str | None = None
        self.run: Any = None
        self.marked = False
        self.interruptible = False  # True while the point's jobs run: the executor stops them on Ctrl-C

    def handler(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            self.echo(f"received {name} again: already stopping")
            return
        self.signal = name
        self.echo(f"received {name}: marking the W&B run preempting, then asking the point's jobs to checkpoint")
        self.mark()
        if self.interruptible:
            raise KeyboardInterrupt  # the local executor sends SIGTERM to its jobs and waits for them

    def mark(self) -> None:
        if self.run is None or self.marked:
            return
        try:
            self.run.mark_preempting()
            self.marked = True
        except Exception as e:  # noqa: BLE001 - the jobs must still be stopped cleanly
            self.echo(f"W&B: mark_preempting failed: {type(e).__name__}: {e}")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        old = {sig: signal.signal(sig, self.handler) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class PointExecutor(LocalExecutor):
    """The local executor for one sweep point: it adds the point's jobs to the study's plan (other
    agents add theirs) instead of replacing it, and leaves the states of cached jobs alone."""

    def write_plan(self, plan: Plan, spec_path: Path) -> None:
        merge_plan(self.paths, plan, spec_path)

    def mark_cached(self, key: str) -> None:
        if read_state(self.paths, key) is None:
            write_state(self.paths, key, "cached", executor=self.name)


def merge_plan(paths: StudyPaths, plan: Plan, spec_path: Path) -> None:
    """Append ``plan``'s jobs that the study's plan.json lacks (in order: upstream jobs are there)."""
    with file_lock(paths.dir / ".plan.lock"):
        if not paths.plan.exists():
            write_plan(paths, plan, spec_path)
            return
        data = read_plan(paths)
        known = {j["key"] for j in data["jobs"]}
        data["jobs"] += [plan_entry(j) for j in plan.jobs if j.key not in known]
        atomic_write_json(paths.plan, data)


def point_metrics(paths: StudyPaths, jobs: Sequence[Job]) -> dict[str, float]:
    """What the sweep run reports: for every metric the point's jobs logged (their last value each),
    ``<stage id>/<metric>`` = the mean over that stage's jobs and ``<metric>`` = the mean over all of
    them (e.g. ``heads_kept``: the mean over the languages' prune jobs)."""
    per_stage: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        last: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in paths.job(job.key).metrics.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    last.update({k: v for k, v in row.items() if k not in ("time", "step") and isinstance(v, int | float)})
        for name, value in last.items():
            per_stage[job.stage_id][name].append(float(value))
    out: dict[str, float] = {}
    overall: dict[str, list[float]] = defaultdict(list)
    for sid, metrics in per_stage.items():
        for name, values in metrics.items():
            out[f"{sid}/{name}"] = sum(values) / len(values)
            overall[name] += values
    for name, values in overall.items():
        out.setdefault(name, sum(values) / len(values))
    return out


def point_values(config: Mapping[str, Any], run_config: Any) -> dict[str, Any]:
    """The values W&B chose for this run, by sweep parameter name."""
    names = list(config.get("parameters", {}))
    missing = [n for n in names if n not in run_config]
    if missing:
        raise OrchestratorError(
            f"the W&B run's config has no value for {', '.join(missing)}: agent-run must be started by `wandb agent` "
            "for this study's sweep (python -m orchestrator sweep SPEC --wandb-agents N)"
        )
    return {n: run_config[n] for n in names}


def agent_run(frozen: Path, *, wandb: ModuleType | Any = None, echo: Callable[[str], None] | None = None) -> int:
    """One W&B sweep run: plan the point W&B chose and run its jobs here. Exit codes: 0 done,
    1 a job failed, 3 preempted (the run was marked preempting; W&B re-issues it)."""
    echo = echo or (lambda msg: print(msg, flush=True))
    data = yaml.safe_load(frozen.read_text(encoding="utf-8"))
    config = data.get("sweep") or {}
    tracking = data.get("tracking") or {}
    root = Path(data["storage"]["root"])
    load_api_key(Path.cwd(), root)
    wandb = wandb or import_wandb()
    pre = _Preemption(echo)
    with pre.installed():
        pre.run = run = wandb.init(
            project=tracking.get("project"),
            entity=tracking.get("entity"),
            group=data["name"],
            job_type="sweep-point",
            config={"orchestrator": {"study": data["name"], "frozen_spec": str(frozen)}},
        )
        try:
            rc, metrics = _run_point(frozen, config, run, pre, echo)
        except BaseException:
            run.finish(exit_code=EXIT_FAILED)
            raise
        if pre.signal is not None or rc in (EXIT_INTERRUPTED, EXIT_ABORTED):
            pre.mark()
            run.finish(exit_code=EXIT_INTERRUPTED)
            echo("preempted: the W&B run is marked preempting and exits 3, so W&B re-issues it; nothing is lost")
            return EXIT_INTERRUPTED
        if rc == EXIT_OK:
            if metrics:
                run.log(metrics)
            target = (config.get("metric") or {}).get("name")
            if target and target not in metrics:
                echo(f"warning: no job of this point logged the sweep metric {target!r}; W&B cannot rank this run")
        run.finish(exit_code=rc)
        return rc


def _run_point(
    frozen: Path, config: Mapping[str, Any], run: Any, pre: _Preemption, echo: Callable[[str], None]
) -> tuple[int, dict[str, float]]:
    if pre.signal is not None:  # stopped while the run was starting
        return EXIT_INTERRUPTED, {}
    values = point_values(config, run.config)
    override = f"sweep={flow_yaml(pinned_sweep(values))}"
    echo(f"sweep point {canonical_json(values)}; the same jobs run anywhere with:")
    echo(f"  python -m orchestrator submit {shlex.quote(str(frozen))} --set {shlex.quote(override)}")
    study, registry = load_study(frozen, [override])
    plan = build_plan(study, registry)
    split = split_plan(plan, axis_names(study))
    paths = StudyPaths(study.storage.root.resolve(), study.name)
    store = open_store(paths.root)
    missing = [j.label for j in split.upstream if store.job_outputs(j.key) is None]
    if missing:
        raise OrchestratorError(
            f"the sweep's shared upstream jobs are not committed: {', '.join(missing)}; `sweep --wandb-agents` queues "
            "them before the agents (afterok), so they failed or were cancelled: see `python -m orchestrator status "
            f"{study.name} --store {paths.root}`"
        )
    with contextlib.suppress(Exception):
        run.config.update(
            {"orchestrator": {"study": study.name, "frozen_spec": str(frozen), "jobs": {j.label: j.key for j in split.swept}}},
            allow_val_change=True,
        )
    for var in SWEEP_ENV:  # the jobs' own W&B runs are ordinary runs, not this sweep run
        os.environ.pop(var, None)
    point = Plan(study, [*split.upstream, *split.swept])
    executor = PointExecutor(paths, store, max_parallel=study.executor.local.max_parallel, echo=echo)
    try:
        with contextlib.ExitStack() as locks:
            pre.interruptible = True
            if pre.signal is not None:
                raise KeyboardInterrupt
            # two agents may hold points that share jobs (the same value twice): one runs them, the other waits
            for key in sorted(j.key for j in split.swept):
                locks.enter_context(file_lock(paths.job(key).dir / "agent.lock"))
            report = executor.submit(point, frozen)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED, {}
    finally:
        pre.interruptible = False
    if report.interrupted:
        return EXIT_INTERRUPTED, {}
    if not report.ok:
        states = {getattr(read_state(paths, k), "state", None) for k in report.failed}
        if states == {"interrupted"} and not report.skipped:  # the jobs were told to stop (SLURM signals them too)
            return EXIT_INTERRUPTED, {}
        echo(views.report_summary(point, report, paths))
        return EXIT_FAILED, {}
    echo(views.report_summary(point, report, paths))
    return EXIT_OK, point_metrics(paths, split.swept)
