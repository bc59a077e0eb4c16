"""The batch scripts (pure, pinned by golden files): ``#SBATCH`` options from a submission's
resources, the signal-forwarding loop every job script runs, the template's placeholders, and
``--dependency`` arguments. Every value is ``shlex``-quoted; no spec value reaches a shell.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.exitcodes import EXIT_INTERRUPTED
from orchestrator.packaged import slurm_template

from .layout import Submission, array_spec

DEFAULT_TEMPLATE = slurm_template()  # slurm_templates/default.sbatch, installed or in the checkout
PLACEHOLDERS = ("directives", "study", "stage", "workdir", "command")
PLACEHOLDER_RE = re.compile(r"\{\{(\w+)\}\}")


def sbatch_options(sub: Submission, study: str, log_dir: Path, parallelism: int | None = None) -> dict[str, str]:
    """The #SBATCH options of a submission (everything but the dependency, known only at submit time)."""
    res = sub.resources
    opts: dict[str, str] = {
        "job_name": f"{study}.{sub.stage_id}",
        "output": str(log_dir / ("%x-%A_%a.out" if sub.array else "%x-%j.out")),
        "cpus_per_task": str(res.cpus),
        "kill_on_invalid_dep": "yes",
        "requeue": "",
        "open_mode": "append",  # a requeued job keeps what SLURM wrote before
        "signal": f"B:USR2@{res.signal_lead_s}",
    }
    if sub.array:
        opts["array"] = array_spec(sub.indices, parallelism)
    optional = {
        "mem": f"{int(res.mem_gb * 1024)}M" if res.mem_gb else None,
        "time": str(res.time_min) if res.time_min else None,
        "gpus": str(res.gpus) if res.gpus else None,
        "partition": res.partition,
        "account": res.account,
        "qos": res.qos,
        "constraint": res.constraint,
        "gres": res.gres,
    }
    opts.update({k: v for k, v in optional.items() if v is not None})
    opts.update({k.replace("-", "_"): v for k, v in res.extra.items()})
    return opts

@functools.cache
def _sbatch_parser() -> Any:
    """simple-slurm's sbatch option parser (building one takes ~8 ms: made once, reused)."""
    from simple_slurm import Slurm

    return Slurm()

def render_directives(options: dict[str, str]) -> str:
    """``#SBATCH`` lines via simple-slurm (which validates option names), every value quoted."""
    for key, value in options.items():
        if any(c in value for c in "\n\r\0"):
            raise OrchestratorError(f"sbatch option {key!r} contains a line break or NUL: {value!r}")
    slurm = _sbatch_parser()
    slurm.namespace = type(slurm.namespace)()  # no options yet: one parser serves every submission
    try:
        slurm.add_arguments(**{k: shlex.quote(v) if v else "" for k, v in sorted(options.items())})
    except SystemExit:
        raise OrchestratorError(f"unknown sbatch option among {sorted(options)}; see `man sbatch`") from None
    lines = slurm.script(shell="/bin/bash", convert=False).splitlines()
    return "\n".join(line.rstrip() for line in lines if line.startswith("#SBATCH"))

def render_command(python: str, list_path: Path, max_requeues: int = 3) -> str:
    """Run the job's runner under ``render_signal_loop``; requeue when it checkpointed (exit 3)
    after USR2, the time-limit signal. The runner exits 3 only when a requeue resumes something: a
    stage that could not checkpoint exits 4, and after ``max_requeues`` restarts
    (``SLURM_RESTART_COUNT``) the job ends as timeout instead, so a job never requeues itself
    forever. Not after TERM: that is ``scancel`` (a cancelled job that requeued itself would run on)
    or SLURM's own preemption, which requeues by itself."""
    run = " ".join(
        shlex.quote(p)
        for p in (python, "-m", "orchestrator", "run-job", "--list", str(list_path), "--max-requeues", str(max_requeues))
    )
    threads = 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"'
    threads += ' MKL_NUM_THREADS="${MKL_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"'
    loop = render_signal_loop(
        f'{run} --index "${{SLURM_ARRAY_TASK_ID:-0}}"',
        requeue_if=f'[ "$rc" -eq {EXIT_INTERRUPTED} ] && [ "$requeue" -eq 1 ]',
        message="checkpointed; requeueing ${SLURM_JOB_ID}",
    )
    return f"{threads}  # thread pools sized by the job's cpus, not the node's\n{loop}"

def render_signal_loop(command: str, *, requeue_if: str, message: str) -> str:
    """The batch shell's part of every job script (pure): start ``command`` (a shell command line)
    in the background, so that the shell, which SLURM signals, can forward USR2 (the time limit is
    near: ``--signal=B:USR2@...``) and TERM (``scancel``) to it; wait until it has really ended; then
    requeue the job when the shell test ``requeue_if`` holds (it sees ``$rc``, the command's exit
    status, and ``$requeue``, 1 once USR2 came), saying ``message`` (text for a double-quoted
    echo); exit with the command's status."""
    return f"""\
{command} &
child=$!
requeue=0
trap 'requeue=1; kill -USR2 "$child" 2>/dev/null' USR2
trap 'kill -TERM "$child" 2>/dev/null' TERM
while true; do
  wait "$child"; rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if {requeue_if}; then
  echo "{message}"
  scontrol requeue "${{SLURM_JOB_ID}}"
fi
exit "$rc\""""

def render_script(template: str, *, directives: str, study: str, stage: str, workdir: Path, command: str) -> str:
    """Fill a template's ``{{placeholders}}`` in one pass; pure, so a golden-file test can pin it."""
    values = {
        "directives": directives,
        "study": shlex.quote(study),
        "stage": shlex.quote(stage),
        "workdir": shlex.quote(str(workdir)),
        "command": command,
    }
    for name in ("directives", "command"):
        if "{{" + name + "}}" not in template:
            raise OrchestratorError(f"the sbatch template has no {{{{{name}}}}} placeholder")

    def fill(m: re.Match[str]) -> str:
        if m[1] not in values:
            raise OrchestratorError(f"unknown placeholder {m[0]} in the sbatch template; valid: {', '.join(PLACEHOLDERS)}")
        return values[m[1]]

    return PLACEHOLDER_RE.sub(fill, template)

def dependency_arg(conditions: Sequence[str]) -> list[str]:
    """``--dependency=afterok:1:2,aftercorr:3`` (every condition must hold); built here, not by
    simple-slurm, which joins lists with the wrong separator."""
    return [f"--dependency={','.join(conditions)}"] if conditions else []

def afterok(ids: Sequence[str]) -> list[str]:
    """The condition "after every one of ``ids`` succeeded", none for no ids."""
    return [f"afterok:{':'.join(ids)}"] if ids else []
