"""What a W&B sweep's agents are given, all in the sweep's folder (``studies/<study>/wandb-sweep/<time>/``):
the frozen study they run, the W&B sweep config that starts ``agent-run`` on it, and the SLURM array
of agents: its resources, options and batch script, rendered by the SLURM executor's own functions
(the same ``#SBATCH`` options and the same signal-forwarding loop as every job script)."""

from __future__ import annotations

import copy
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.executors.slurm import (
    DEFAULT_TEMPLATE,
    Submission,
    render_directives,
    render_script,
    render_signal_loop,
    sbatch_options,
)
from orchestrator.fsutil import atomic_write_text
from orchestrator.plan import Job
from orchestrator.resources import Resources
from orchestrator.spec import Study
from orchestrator.sweeps.config import Prepared

AGENT_STAGE = "wandb-agent"  # the agents' name in job names, submission records and scripts
SWEEP_DIR = "wandb-sweep"  # studies/<study>/wandb-sweep/<time>/: frozen study, W&B config, script, logs
FROZEN_FILE = "study.yaml"
CONFIG_FILE = "wandb-sweep.yaml"
SCRIPT_FILE = "agents.sbatch"
AGENT_COUNT = 1  # runs per agent start: a requeued array task then starts a fresh agent for one run


def freeze(prepared: Prepared, folder: Path) -> Path:
    """Write the study as the agents will read it: every override applied, paths absolute."""
    data = prepared.study.model_dump(mode="json")
    data["sweep"] = prepared.config
    data["storage"]["root"] = str(prepared.study.storage.root.resolve())
    if prepared.study.executor.slurm.template is not None:
        data["executor"]["slurm"]["template"] = str(prepared.study.executor.slurm.template.resolve())
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


def agent_resources(study: Study, jobs: Sequence[Job]) -> Resources:
    """What one agent asks for: the largest cpus, mem_gb and gpus of the point's stages (its jobs
    run ``executor.local.max_parallel`` at a time), the sum of its jobs' time_min (all run in one
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
    """The array's #SBATCH options: a job script's (``--requeue``, ``--signal``, ``--open-mode=append``,
    ``--kill-on-invalid-dep``), for ``agents`` tasks logging to ``log_dir``."""
    sub = Submission(AGENT_STAGE, tuple((i, str(i)) for i in range(agents)), (), resources, array=agents > 1)
    opts = sbatch_options(sub, study, log_dir)
    opts["array"] = f"0-{agents - 1}"
    opts["output"] = str(log_dir / "%x-%A_%a.out")
    return opts


def render_agent_command(wandb_cli: str, path: str, wandb_dir: Path, count: int = AGENT_COUNT) -> str:
    """Run the agent under the job scripts' signal loop (with --forward-signals it passes the
    signals on to its run). After USR2 (the time limit is near) the task is requeued whatever the
    agent's exit status: the run was marked preempting, W&B re-issues it, and the requeued task
    starts a fresh agent."""
    agent = shlex.join([wandb_cli, "agent", "--count", str(count), "--forward-signals", path])
    loop = render_signal_loop(
        agent,
        requeue_if='[ "$requeue" -eq 1 ]',
        message="time limit near: the W&B run was marked preempting; requeueing ${SLURM_JOB_ID} for a fresh agent",
    )
    return f"export WANDB_DIR={shlex.quote(str(wandb_dir))}\n{loop}"


def render_agent_script(
    study: Study, resources: Resources, agents: int, folder: Path, wandb_cli: str, path: str, workdir: Path
) -> str:
    """The agents' batch script, from the study's sbatch template like every job script."""
    template = (study.executor.slurm.template or DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    return render_script(
        template,
        directives=render_directives(agent_options(study.name, resources, agents, folder)),
        study=study.name,
        stage=AGENT_STAGE,
        workdir=workdir,
        command=render_agent_command(wandb_cli, path, folder),
    )
