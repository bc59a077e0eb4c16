"""Sweeps run by a W&B server: ``python -m orchestrator sweep SPEC --wandb-agents N``.

The built-in runner (orchestrator.sweep) expands a sweep into a matrix of jobs. With a W&B server,
W&B's sweep controller picks the points instead (grid, random, or bayes, which only it can do):

1. **Split.** The study is planned with a probe sweep (one value per parameter). Jobs with no sweep
   axis in their point and not downstream of one (corpus, tokenizer, training) are the **shared
   upstream**; jobs with a sweep axis are the **point's jobs**; jobs that gather every point (a stage
   that ``collect``s an axis) are not run by agents, which see one point each.
2. **Create.** ``wandb.sweep(config, project=, entity=)`` with the spec's sweep section, whose
   ``program`` is a frozen copy of the study (``studies/<study>/wandb-sweep/<time>/study.yaml``,
   every override applied, storage root absolute) and whose ``command`` is
   ``<python> -m orchestrator agent-run ${program}``.
3. **Queue.** The shared upstream is submitted like ``submit`` does (SlurmExecutor), then one SLURM
   array of N tasks, each ``wandb agent --count 1 --forward-signals <entity/project/sweep id>``,
   with ``--dependency=afterok:<upstream ids>``, ``--signal=B:USR2@120`` and ``--requeue``.
4. **Agent run.** Inside the ``wandb.init()`` run the agent starts, ``agent-run`` reads
   ``wandb.config``, pins the study's sweep to that one point (``--set sweep={method: grid,
   parameters: {<stage>.<param>: {value: v}}}``, so keys, labels and artifact names are those the
   built-in sweep gives the same values), and runs the point's jobs with the local executor inside
   the agent's allocation. The shared upstream is committed, so it is cached by key and resolved by
   lineage as in any submit. The point's metrics go to the sweep run (see ``point_metrics``).
5. **Preemption.** On SIGUSR2 (the time limit is near: the batch shell forwards it through the agent)
   or SIGTERM, the agent run calls ``run.mark_preempting()`` *before* asking its jobs to checkpoint,
   then exits 3: W&B records the run as preempted, not finished, and re-issues it to an agent; the
   batch shell requeues the array task after USR2, and the re-issued point resumes from its jobs'
   checkpoints (completed jobs are cached).

Nothing here can talk to a W&B server in the tests: the online path is tested with fakes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from orchestrator.artifacts import ArtifactStore
from orchestrator.artifacts.locking import file_lock
from orchestrator.errors import OrchestratorError, SpecError, SpecIssue
from orchestrator.executors.base import cached_keys
from orchestrator.executors.local import LocalExecutor
from orchestrator.fsutil import atomic_write_json, atomic_write_text
from orchestrator.paths import StudyPaths
from orchestrator.plan import Job, Plan, build_plan
from orchestrator.records import now, plan_entry, read_plan, read_state, write_plan, write_state
from orchestrator.runner import EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from orchestrator.source import SpecSource, apply_overrides, load_source
from orchestrator.spec import Resources, Study, canonical_json, load_study
from orchestrator.stage import Registry
from orchestrator.sweep import schema_errors

AGENT_STAGE = "wandb-agent"  # the agents' name in job names, submission records and scripts
SWEEP_DIR = "wandb-sweep"  # studies/<study>/wandb-sweep/<time>/: frozen study, W&B config, script, logs
FROZEN_FILE = "study.yaml"
CONFIG_FILE = "wandb-sweep.yaml"
SCRIPT_FILE = "agents.sbatch"
AGENT_COUNT = 1  # runs per agent start: a requeued array task then starts a fresh agent for one run
WANDB_METHODS = ("grid", "random", "bayes")
# set by `wandb agent` for its run; the point's jobs must not see them, or wandb.init in a job would
# take the job's own run for the sweep run (wandb ignores the run id it is given inside a sweep)
SWEEP_ENV = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


# ------------------------------------------------------------------------------------ the split
@dataclass(frozen=True)
class Split:
    """A plan's jobs by their role in a W&B sweep (each list in plan order)."""

    upstream: list[Job]  # no sweep axis, not downstream of one: run once, before any agent
    swept: list[Job]  # a sweep axis in their point: the jobs of one point (in an agent run)
    gathered: list[Job]  # downstream of swept jobs without their axis (collect): not run by agents


def split_plan(plan: Plan, axis_names: set[str]) -> Split:
    swept = [job for job in plan.jobs if axis_names & set(job.point)]
    below = plan.downstream({job.key for job in swept})
    swept_keys = {job.key for job in swept}
    upstream = [job for job in plan.jobs if job.key not in swept_keys and job.key not in below]
    gathered = [job for job in plan.jobs if job.key in below and job.key not in swept_keys]
    return Split(upstream, swept, gathered)


def axis_names(study: Study) -> set[str]:
    return {axis.name for axis in study.sweep_axes()}


# ---------------------------------------------------------------------- loading a W&B sweep spec
@dataclass
class Prepared:
    study: Study  # its sweep is the spec's W&B config again (the probe only served to plan)
    registry: Registry
    config: dict[str, Any]  # the spec's sweep section, as written (+ overrides)
    plan: Plan  # planned with the probe sweep: one point
    split: Split


def flow_yaml(value: Any) -> str:
    """``value`` as one line of YAML that ``yaml.safe_load`` (hence ``--set``) reads back equal."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, sort_keys=False).strip()
    if yaml.safe_load(text) != value:
        raise OrchestratorError(f"cannot write {value!r} as a --set value")
    return text


def pinned_sweep(values: Mapping[str, Any]) -> dict[str, Any]:
    """A grid sweep of exactly one point: how an agent run plans the point W&B chose."""
    return {"method": "grid", "parameters": {name: {"value": v} for name, v in values.items()}}


def candidates(spec: Mapping[str, Any]) -> list[Any]:
    """Values of a W&B parameter spec that the stage must accept: every listed value, or the ends
    (or centre) of a distribution. The first one stands for the parameter when planning."""
    if "value" in spec:
        out = [spec["value"]]
    elif "values" in spec:
        out = list(spec["values"])
    else:
        lo, hi = spec.get("min"), spec.get("max")
        dist = spec.get("distribution") or ("int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
        mu = float(spec.get("mu", 0.0))
        if dist in ("int_uniform",):
            out = [int(lo), int(hi)]
        elif dist in ("uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"):
            out = [float(lo), float(hi)]
        elif dist in ("log_uniform", "q_log_uniform"):
            out = [math.exp(float(lo)), math.exp(float(hi))]
        elif dist == "inv_log_uniform":
            out = [math.exp(-float(hi)), math.exp(-float(lo))]
        elif dist in ("normal", "q_normal"):
            out = [mu]
        elif dist in ("log_normal", "q_log_normal"):
            out = [math.exp(mu)]
        elif dist in ("beta", "q_beta"):
            a, b = float(spec.get("a", 1.0)), float(spec.get("b", 1.0))
            out = [a / (a + b)]
        else:
            raise ValueError(f"distribution {dist!r} is not known to the W&B sweep path")
    return list({canonical_json(v): v for v in out}.values())


def check_config(config: Any, source: SpecSource) -> list[SpecIssue]:
    """W&B's schema, then what this path needs (on top of what the stages need, checked later)."""
    if not isinstance(config, dict):
        return [source.issue(("sweep",), "must be a W&B sweep config (a mapping)")]
    issues = [source.issue(("sweep", *path), msg) for path, msg in schema_errors(config)]
    if issues:
        return issues
    method = config["method"]
    if method not in WANDB_METHODS:
        issues.append(source.issue(("sweep", "method"), f"the W&B sweep path runs {', '.join(WANDB_METHODS)}, not {method}"))
    if method == "bayes" and "metric" not in config:
        issues.append(source.issue(("sweep",), "method bayes needs a metric: {name: ..., goal: minimize|maximize}"))
    if "early_terminate" in config:
        issues.append(
            source.issue(
                ("sweep", "early_terminate"),
                "not supported with --wandb-agents: W&B stops a run early with SIGTERM, which an agent run "
                "takes for preemption (the run would be re-issued); remove it",
            )
        )
    for key in ("program", "command"):
        if key in config:
            issues.append(source.issue(("sweep", key), "set by the orchestrator (it runs the frozen study); remove it"))
    return issues + [i for name, spec in config["parameters"].items() if (i := _check_param(name, spec, source))]


def _check_param(name: str, spec: Any, source: SpecSource) -> SpecIssue | None:
    if isinstance(spec, dict) and "parameters" in spec:
        return source.issue(("sweep", "parameters", name), "nested parameters are not supported; use <stage>.<param>")
    try:
        candidates(spec)
    except (ValueError, TypeError) as e:
        return source.issue(("sweep", "parameters", name), str(e))
    return None


def load_sweep(spec: Path, overrides: Sequence[str] = ()) -> Prepared:
    """Load a study whose sweep W&B will run (bayes allowed here only), plan it, split the plan."""
    source = apply_overrides(load_source(spec), overrides)
    config = source.data.get("sweep")
    if config is None:
        raise OrchestratorError(f"{spec} has no sweep section; see README (Sweeps) or use submit")
    issues = check_config(config, source)
    if issues:
        raise SpecError(issues)
    params = config["parameters"]
    probe = {"method": "grid", "parameters": {name: {"values": candidates(s)} for name, s in params.items()}}
    try:  # the stages validate every candidate value, exactly as for a built-in sweep
        study, registry = load_study(spec, [*overrides, f"sweep={flow_yaml(probe)}"])
    except SpecError as e:
        raise SpecError([_relocate(issue, source, params) for issue in e.issues]) from None
    study.sweep = pinned_sweep({name: candidates(s)[0] for name, s in params.items()})
    plan = build_plan(study, registry)
    split = split_plan(plan, axis_names(study))
    study.sweep = copy.deepcopy(config)
    return Prepared(study, registry, copy.deepcopy(config), plan, split)


def _relocate(issue: SpecIssue, source: SpecSource, params: Mapping[str, Any]) -> SpecIssue:
    """An issue found in the probe sweep, pointed back at the spec's own sweep section."""
    if not issue.source.startswith("--set sweep="):
        return issue
    name = issue.field.removeprefix("sweep.parameters.")
    loc = ("sweep", "parameters", name) if name in params else ("sweep",)
    return replace(issue, source=source.where(loc))


# ------------------------------------------------------------------------- frozen study, config
def freeze(prepared: Prepared, folder: Path) -> Path:
    """Write the study as the agents will read it: every override applied, paths absolute."""
    data = prepared.study.model_dump(mode="json")
    data["sweep"] = prepared.config
    data["storage"]["root"] = str(prepared.study.storage.root.resolve())
    if prepared.study.executor.template is not None:
        data["executor"]["template"] = str(prepared.study.executor.template.resolve())
    path = folder / FROZEN_FILE
    header = (
        "# Frozen by `python -m orchestrator sweep --wandb-agents`: W&B agents run `agent-run` on this file,\n"
        "# which plans the point W&B chose by pinning the sweep: --set 'sweep={method: grid, parameters: ...}'\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def wandb_config(config: Mapping[str, Any], frozen: Path, study: str, python: str = sys.executable) -> dict[str, Any]:
    """The config W&B gets: the spec's sweep section plus the program its agents start."""
    out = copy.deepcopy(dict(config))
    out.setdefault("name", study)
    out["program"] = str(frozen)
    out["command"] = [python, "-m", "orchestrator", "agent-run", "${program}"]
    return out


def sweep_path(sweep_id: str, project: str, entity: str | None) -> str:
    return "/".join(p for p in (entity, project, sweep_id) if p)


# ------------------------------------------------------------------------------- the agent array
def agent_resources(study: Study, jobs: Sequence[Job]) -> Resources:
    """What one agent asks for: the largest cpus, mem_gb and gpus of the point's stages (its jobs
    run ``executor.max_parallel`` at a time), the sum of its jobs' time_min (all run in one
    allocation), and the first point stage's partition, account, qos, constraint, gres and extra."""
    per = [study.executor.resources_for(sid) for sid in dict.fromkeys(j.stage_id for j in jobs)]
    base = per[0].model_dump()
    base["cpus"] = max(r.cpus for r in per)
    base["gpus"] = max(r.gpus for r in per)
    mems = [r.mem_gb for r in per if r.mem_gb]
    base["mem_gb"] = max(mems) if mems else None
    times = [study.executor.resources_for(j.stage_id).time_min for j in jobs]
    base["time_min"] = sum(t for t in times if t) if all(times) else None
    return Resources.model_validate(base)


def agent_options(study: str, resources: Resources, agents: int, log_dir: Path) -> dict[str, str]:
    from orchestrator.executors.slurm import Submission, sbatch_options

    sub = Submission(AGENT_STAGE, tuple((i, str(i)) for i in range(agents)), (), resources, array=agents > 1)
    opts = sbatch_options(sub, study, log_dir)  # --requeue, --signal, --open-mode=append, --kill-on-invalid-dep
    opts["array"] = f"0-{agents - 1}"
    opts["output"] = str(log_dir / "%x-%A_%a.out")
    return opts


def render_agent_command(wandb_cli: str, path: str, wandb_dir: Path, count: int = AGENT_COUNT) -> str:
    """Start the agent in the background so the batch shell can forward signals to it (and it, with
    --forward-signals, to its run). After USR2 (the time limit is near) the task is requeued: the
    run was marked preempting, W&B re-issues it, and the requeued task starts a fresh agent."""
    agent = shlex.join([wandb_cli, "agent", "--count", str(count), "--forward-signals", path])
    return f"""\
export WANDB_DIR={shlex.quote(str(wandb_dir))}
{agent} &
child=$!
requeue=0
trap 'requeue=1; kill -USR2 "$child" 2>/dev/null' USR2
trap 'kill -TERM "$child" 2>/dev/null' TERM
while true; do
  wait "$child"; rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if [ "$requeue" -eq 1 ]; then
  echo "time limit near: the W&B run was marked preempting; requeueing ${{SLURM_JOB_ID}} for a fresh agent"
  scontrol requeue "${{SLURM_JOB_ID}}"
fi
exit "$rc\""""


def render_agent_script(
    study: Study, resources: Resources, agents: int, folder: Path, wandb_cli: str, path: str, workdir: Path
) -> str:
    from orchestrator.executors.slurm import DEFAULT_TEMPLATE, render_directives, render_script

    template = (study.executor.template or DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    return render_script(
        template,
        directives=render_directives(agent_options(study.name, resources, agents, folder)),
        study=study.name,
        stage=AGENT_STAGE,
        workdir=workdir,
        command=render_agent_command(wandb_cli, path, folder),
    )


def find_wandb_cli() -> str | None:
    """``wandb`` on PATH, else the one installed next to this Python."""
    found = shutil.which("wandb")
    if found:
        return found
    sibling = Path(sys.executable).parent / "wandb"
    return str(sibling) if sibling.exists() else None


# ------------------------------------------------------------------------------------ submitting
def check_tracking(study: Study, env: Mapping[str, str] = os.environ) -> None:
    t = study.tracking
    if t.backend != "wandb":
        raise OrchestratorError(
            f"--wandb-agents needs a W&B server, but tracking.backend is {t.backend!r}: set tracking: "
            "{backend: wandb, project: <project>} (or --set tracking.backend=wandb), or drop --wandb-agents "
            "to let the orchestrator run the sweep itself"
        )
    if not t.project:
        raise OrchestratorError("--wandb-agents needs tracking.project: the W&B project that holds the sweep and its runs")
    wandb_mode = env.get("WANDB_MODE", "").strip().lower()
    if t.mode == "offline" or wandb_mode in ("offline", "dryrun", "disabled"):
        what = "tracking.mode is offline" if t.mode == "offline" else f"WANDB_MODE={wandb_mode}"
        raise OrchestratorError(
            f"--wandb-agents needs W&B online (a server creates the sweep and hands out its points), but {what}; "
            "unset it / set tracking.mode: online where the server is reachable, or drop --wandb-agents to run "
            "the sweep with the built-in runner (offline runs can be uploaded later with `sync`)"
        )


def _sweep_folder(paths: StudyPaths) -> Path:
    stamp = now().replace(":", "").replace("+0000", "Z")
    base = paths.dir / SWEEP_DIR / stamp
    folder, n = base, 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{stamp}-{n}")


def submit_agents(
    spec: Path,
    overrides: Sequence[str],
    agents: int,
    *,
    dry_run: bool = False,
    force: bool = False,
    wandb: ModuleType | Any = None,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    echo: Callable[[str], None] = print,
) -> int:
    """Create the W&B sweep, queue the shared upstream, then the agent array after it. Every check
    comes first: a refused sweep creates nothing and submits nothing."""
    from orchestrator.artifacts import open_store
    from orchestrator.executors.slurm import require_slurm
    from orchestrator.tracking.wandb import import_wandb, load_api_key

    if agents < 1:
        raise OrchestratorError("--wandb-agents needs at least 1 agent")
    if force:
        raise OrchestratorError("--force is not supported with --wandb-agents (agents never rerun committed jobs)")
    prepared = load_sweep(spec, overrides)
    check_tracking(prepared.study)
    paths = StudyPaths(prepared.study.storage.root.resolve(), prepared.study.name)
    has_key = load_api_key(Path.cwd(), paths.root)
    wandb_cli = find_wandb_cli()
    if not dry_run:
        if not has_key:
            raise OrchestratorError(
                "--wandb-agents needs a W&B API key: set WANDB_API_KEY, or put WANDB_API_KEY=... in a .env file in "
                f"{Path.cwd()} or {paths.root} (the key is never written to specs, scripts or records); nothing was submitted"
            )
        require_slurm()
        if wandb_cli is None:
            raise OrchestratorError("the `wandb` command is not on PATH (pip install 'cross-lingual-subnets[wandb]')")
        wandb = wandb or import_wandb()
    _describe(prepared, agents, echo)
    folder = _sweep_folder(paths)
    config = wandb_config(prepared.config, freeze(prepared, folder), prepared.study.name)
    atomic_write_text(folder / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    job = _AgentJob(prepared, paths, open_store(paths.root), folder, config, agents, wandb_cli or "wandb", spec, echo)
    if dry_run:
        job.dry_run(has_key)
    else:
        job.queue(wandb, run)
    return 0


@dataclass
class _AgentJob:
    """One ``sweep --wandb-agents``: its folder is written; what is left is to show it or queue it."""

    prepared: Prepared
    paths: StudyPaths
    store: ArtifactStore
    folder: Path
    config: dict[str, Any]
    agents: int
    wandb_cli: str
    spec: Path
    echo: Callable[[str], None]

    @property
    def upstream(self) -> Plan:
        return Plan(self.prepared.study, self.prepared.split.upstream)

    def script(self, path: str) -> Path:
        study = self.prepared.study
        resources = agent_resources(study, self.prepared.split.swept)
        text = render_agent_script(study, resources, self.agents, self.folder, self.wandb_cli, path, Path.cwd())
        script = self.folder / SCRIPT_FILE
        atomic_write_text(script, text)
        return script

    def path(self, sweep_id: str) -> str:
        t = self.prepared.study.tracking
        return sweep_path(sweep_id, t.project or "", t.entity)

    def dry_run(self, has_key: bool) -> None:
        from orchestrator.executors.slurm import SlurmExecutor, dependency_arg

        echo = self.echo
        echo(f"\ndry run: W&B and SLURM are not contacted; the W&B sweep config ({self.folder / CONFIG_FILE}):")
        echo(yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True).rstrip())
        if not has_key:
            echo("note: no W&B API key found (WANDB_API_KEY or .env); the real submit needs one")
        echo("\n# shared upstream (submitted first):")
        template = self.prepared.study.executor.template
        SlurmExecutor(self.paths, self.store, template=template, dry_run=True, echo=echo).submit(self.upstream, self.spec)
        script = self.script(self.path("<sweep-id>"))
        pending = {j.key for j in self.upstream.jobs} - cached_keys(self.upstream, self.store, force=False)
        deps = dependency_arg(["afterok:<upstream>"]) if pending else []
        echo(f"\n# {self.agents} W&B agents, one SLURM array (after the shared upstream):")
        echo(f"$ {shlex.join(['sbatch', '--parsable', *deps, str(script)])}")
        echo(script.read_text(encoding="utf-8").rstrip())

    def queue(self, wandb: Any, run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
        from orchestrator.executors.slurm import SlurmError, SlurmExecutor, afterok, dependency_arg, latest_submission
        from orchestrator.tracking.wandb import redact

        t = self.prepared.study.tracking
        try:
            sweep_id = str(wandb.sweep(self.config, entity=t.entity, project=t.project))
        except Exception as e:  # noqa: BLE001 - any client/server failure: say so, submit nothing
            raise OrchestratorError(
                redact(f"creating the W&B sweep failed ({type(e).__name__}: {e}); nothing was submitted")
            ) from None
        path = self.path(sweep_id)
        self.echo(f"created W&B sweep {path}")
        template = self.prepared.study.executor.template
        executor = SlurmExecutor(self.paths, self.store, template=template, echo=self.echo, run=run)
        upstream = (latest_submission(self.paths) or []) if executor.submit(self.upstream, self.spec).submitted else []
        up_ids = [str(sub["id"]) for sub in upstream if sub.get("id")]
        cmd = ["sbatch", "--parsable", *dependency_arg(afterok(up_ids)), str(self.script(path))]
        result = run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            if up_ids:
                run(["scancel", *up_ids], capture_output=True, text=True)
            raise SlurmError(
                f"sbatch failed for the W&B agents (exit {result.returncode}): {result.stderr.strip()}\n"
                f"command: {shlex.join(cmd)}\ncancelled the {len(up_ids)} upstream submissions of this sweep; "
                f"the W&B sweep {path} has no agents"
            )
        agent_id = result.stdout.strip().split(";")[0]
        _save(self.paths, self.folder, upstream, up_ids, agent_id, sweep_id, path)
        after = f" after {','.join(up_ids)}" if up_ids else ""
        self.echo(f"sbatch {AGENT_STAGE}: array {agent_id} of {self.agents}{after}")
        self.echo(
            f"queued {self.agents} W&B agents for sweep {path}; follow with: python -m orchestrator status "
            f"{self.prepared.study.name} --store {self.paths.root} (and the sweep's page on W&B); agent logs: {self.folder}"
        )


def _save(
    paths: StudyPaths,
    folder: Path,
    upstream: list[dict[str, Any]],
    up_ids: list[str],
    agent_id: str,
    sweep_id: str,
    path: str,
) -> None:
    """A submission record in the SlurmExecutor's format (so ``cancel`` cancels agents too)."""
    from orchestrator.executors.slurm import afterok, track_submission

    agents = {"stage": AGENT_STAGE, "id": agent_id, "array": True, "tasks": [], "after": afterok(up_ids)}
    atomic_write_json(
        folder / "submission.json",
        {"submissions": [*upstream, agents], "wandb_sweep": {"id": sweep_id, "path": path}, "submitted_at": now()},
    )
    track_submission(paths, folder)


def _describe(prepared: Prepared, agents: int, echo: Callable[[str], None]) -> None:
    config, split = prepared.config, prepared.split

    def count(jobs: list[Job]) -> str:
        return f"{len(jobs)} jobs" + (
            ": " + ", ".join(f"{s} {n}" for s, n in Counter(j.stage_id for j in jobs).items()) if jobs else ""
        )

    echo(f"W&B sweep ({config['method']}) of study {prepared.study.name}, {agents} agents:")
    for name, spec in config["parameters"].items():
        echo(f"  parameter {name}: {canonical_json(spec)}")
    echo(f"  shared upstream (run once, before the agents): {count(split.upstream)}")
    echo(f"  per sweep point (one agent run each): {count(split.swept)}")
    if split.gathered:
        echo(f"  not run by agents (they gather every point; W&B compares the runs instead): {count(split.gathered)}")


def cli_overrides(overrides: Sequence[str], executor: str | None, store: Path | None) -> list[str]:
    """The overrides the CLI's spec options mean (as ``cli._load`` builds them)."""
    out = list(overrides)
    if executor:
        out.append(f"executor.backend={executor}")
    if store:
        out.append(f"storage.root={store}")
    return out


# ------------------------------------------------------------------------------------ agent run
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
    from orchestrator.tracking.wandb import import_wandb, load_api_key

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
    from orchestrator import views
    from orchestrator.artifacts import open_store

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
    executor = PointExecutor(paths, store, max_parallel=study.executor.max_parallel, echo=echo)
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
