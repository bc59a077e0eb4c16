"""``python -m orchestrator sweep SPEC --wandb-agents N``: check everything first, write the sweep's
folder, then either show what would happen (``--dry-run``) or create the W&B sweep, queue the shared
upstream with the SLURM executor and the agents' array after it, and record both as one submit
(in the executor's format, so ``status`` and ``cancel`` see the agents too)."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from orchestrator.artifacts import ArtifactStore, open_store
from orchestrator.errors import OrchestratorError
from orchestrator.executors.base import cached_keys
from orchestrator.executors.slurm import (
    SlurmError,
    SlurmExecutor,
    afterok,
    dependency_arg,
    latest_submission,
    require_slurm,
    save_submission,
    stamped_folder,
)
from orchestrator.fsutil import atomic_write_text
from orchestrator.paths import StudyPaths
from orchestrator.plan import Job, Plan
from orchestrator.records import now
from orchestrator.spec import Study, canonical_json
from orchestrator.sweeps.agents import (
    AGENT_STAGE,
    CONFIG_FILE,
    SCRIPT_FILE,
    SWEEP_DIR,
    agent_resources,
    freeze,
    render_agent_script,
    sweep_path,
    wandb_config,
)
from orchestrator.sweeps.config import Prepared, load_sweep
from orchestrator.sync import wandb_executable
from orchestrator.tracking.wandb import INSTALL_HINT, import_wandb, load_api_key, redact


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
    if agents < 1:
        raise OrchestratorError("--wandb-agents needs at least 1 agent")
    if force:
        raise OrchestratorError("--force is not supported with --wandb-agents (agents never rerun committed jobs)")
    prepared = load_sweep(spec, overrides)
    check_tracking(prepared.study)
    paths = StudyPaths(prepared.study.storage.root.resolve(), prepared.study.name)
    has_key = load_api_key(Path.cwd(), paths.root)
    wandb_cli = wandb_executable()
    if not dry_run:
        if not has_key:
            raise OrchestratorError(
                "--wandb-agents needs a W&B API key: set WANDB_API_KEY, or put WANDB_API_KEY=... in a .env file in "
                f"{Path.cwd()} or {paths.root} (the key is never written to specs, scripts or records); nothing was submitted"
            )
        require_slurm()
        if wandb_cli is None:
            raise OrchestratorError(f"the `wandb` command is not on PATH ({INSTALL_HINT})")
        wandb = wandb or import_wandb()
    _describe(prepared, agents, echo)
    folder = stamped_folder(paths.dir / SWEEP_DIR)
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
        echo = self.echo
        echo(f"\ndry run: W&B and SLURM are not contacted; the W&B sweep config ({self.folder / CONFIG_FILE}):")
        echo(yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True).rstrip())
        if not has_key:
            echo("note: no W&B API key found (WANDB_API_KEY or .env); the real submit needs one")
        echo("\n# shared upstream (submitted first):")
        template = self.prepared.study.executor.slurm.template
        SlurmExecutor(self.paths, self.store, template=template, dry_run=True, echo=echo).submit(self.upstream, self.spec)
        script = self.script(self.path("<sweep-id>"))
        pending = {j.key for j in self.upstream.jobs} - cached_keys(self.upstream, self.store, force=False)
        deps = dependency_arg(["afterok:<upstream>"]) if pending else []
        echo(f"\n# {self.agents} W&B agents, one SLURM array (after the shared upstream):")
        echo(f"$ {shlex.join(['sbatch', '--parsable', *deps, str(script)])}")
        echo(script.read_text(encoding="utf-8").rstrip())

    def queue(self, wandb: Any, run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
        t = self.prepared.study.tracking
        try:
            sweep_id = str(wandb.sweep(self.config, entity=t.entity, project=t.project))
        except Exception as e:  # noqa: BLE001 - any client/server failure: say so, submit nothing
            raise OrchestratorError(
                redact(f"creating the W&B sweep failed ({type(e).__name__}: {e}); nothing was submitted")
            ) from None
        path = self.path(sweep_id)
        self.echo(f"created W&B sweep {path}")
        template = self.prepared.study.executor.slurm.template
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
        agents = {"stage": AGENT_STAGE, "id": agent_id, "array": True, "tasks": [], "after": afterok(up_ids)}
        record = {"submissions": [*upstream, agents], "wandb_sweep": {"id": sweep_id, "path": path}, "submitted_at": now()}
        save_submission(self.paths, self.folder, record)  # the executor's format: `cancel` cancels the agents too
        after = f" after {','.join(up_ids)}" if up_ids else ""
        self.echo(f"sbatch {AGENT_STAGE}: array {agent_id} of {self.agents}{after}")
        self.echo(
            f"queued {self.agents} W&B agents for sweep {path}; follow with: python -m orchestrator status "
            f"{self.prepared.study.name} --store {self.paths.root} (and the sweep's page on W&B); agent logs: {self.folder}"
        )


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
