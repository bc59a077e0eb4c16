"""Sweeps run by a W&B server: ``python -m orchestrator sweep SPEC --wandb-agents N``.

The built-in runner (``orchestrator.sweep``: the sweep section's schema, distributions and
expansion into matrix axes) runs a sweep as a matrix of jobs. With a W&B server, W&B's sweep
controller picks the points instead (grid, random, or bayes, which only it can do):

1. **Split** (``config``). The study is planned with a probe sweep (one value per parameter). Jobs
   with no sweep axis in their point and not downstream of one (corpus, tokenizer, training) are the
   **shared upstream**; jobs with a sweep axis are the **point's jobs**; jobs that gather every point
   (a stage that ``collect``s an axis) are not run by agents, which see one point each.
2. **Create** (``submit``, ``agents``). ``wandb.sweep(config, project=, entity=)`` with the spec's
   sweep section, whose ``program`` is a frozen copy of the study
   (``studies/<study>/wandb-sweep/<time>/study.yaml``, every override applied, storage root
   absolute) and whose ``command`` is ``<python> -m orchestrator agent-run ${program}``.
3. **Queue** (``submit``). The shared upstream is submitted like ``submit`` does (SlurmExecutor),
   then one SLURM array of N tasks, each ``wandb agent --count 1 --forward-signals <entity/project/
   sweep id>``, with ``--dependency=afterok:<upstream ids>``, ``--signal=B:USR2@120`` and ``--requeue``.
4. **Agent run** (``agent_run``). Inside the ``wandb.init()`` run the agent starts, ``agent-run``
   reads ``wandb.config``, pins the study's sweep to that one point (``--set sweep={method: grid,
   parameters: {<stage>.<param>: {value: v}}}``) and runs the point's jobs with the local executor
   inside the agent's allocation; the point's metrics go to the sweep run.
5. **Preemption.** On SIGUSR2 (the time limit is near: the batch shell forwards it through the
   agent) or SIGTERM, the agent run calls ``run.mark_preempting()`` *before* asking its jobs to
   checkpoint, then exits 3; the batch shell requeues the array task after USR2, and the re-issued
   point resumes from its jobs' checkpoints (completed jobs are cached).

Modules: ``config`` (the sweep section on this path, the probe plan and its split), ``agents`` (what
the agents are given: frozen study, W&B config, the array's options and batch script), ``submit``
(the ``sweep --wandb-agents`` command), ``agent_run`` (the ``agent-run`` command). Nothing here can
talk to a W&B server in the tests: the online path is tested with fakes.
"""

from __future__ import annotations

from orchestrator.overrides import cli_overrides
from orchestrator.sweeps.agent_run import SWEEP_ENV, PointExecutor, agent_run, merge_plan, point_metrics, point_values
from orchestrator.sweeps.agents import (
    AGENT_STAGE,
    CONFIG_FILE,
    FROZEN_FILE,
    SCRIPT_FILE,
    SWEEP_DIR,
    agent_options,
    agent_resources,
    freeze,
    render_agent_command,
    render_agent_script,
    sweep_path,
    wandb_config,
)
from orchestrator.sweeps.config import (
    Prepared,
    Split,
    axis_names,
    candidates,
    check_config,
    flow_yaml,
    load_sweep,
    pinned_sweep,
    split_plan,
)
from orchestrator.sweeps.submit import check_tracking, submit_agents

__all__ = [
    "AGENT_STAGE",
    "CONFIG_FILE",
    "FROZEN_FILE",
    "SCRIPT_FILE",
    "SWEEP_DIR",
    "SWEEP_ENV",
    "PointExecutor",
    "Prepared",
    "Split",
    "agent_options",
    "agent_resources",
    "agent_run",
    "axis_names",
    "candidates",
    "check_config",
    "check_tracking",
    "cli_overrides",
    "flow_yaml",
    "freeze",
    "load_sweep",
    "merge_plan",
    "pinned_sweep",
    "point_metrics",
    "point_values",
    "render_agent_command",
    "render_agent_script",
    "split_plan",
    "submit_agents",
    "sweep_path",
    "wandb_config",
]
