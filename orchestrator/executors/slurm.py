"""Queue a whole study on SLURM in one submit, and return.

One sbatch per stage: a job array over the stage's jobs that are not cached (a single job when there
is one). Dependencies are ``afterok`` on the upstream stages' submissions, with
``--kill-on-invalid-dep=yes`` so that a failed job's dependents are cancelled instead of pending
forever. Scripts come from a template (``slurm_templates/default.sbatch`` or the spec's own);
``#SBATCH`` lines are built with simple-slurm, every value ``shlex``-quoted, and no spec value ever
reaches a shell: parameters travel in the job records, never in the script.

Preemption and time limits: ``--signal=B:USR2@<signal_lead_s>`` reaches the batch shell, which
forwards it to the runner; a stage that checkpoints exits with code 3 and the script requeues the
job, whose next start resumes from the checkpoint, at most ``max_requeues`` times; after that, or
for a stage that cannot checkpoint, the job ends as ``timeout`` with a message to raise
``time_min``. TERM (``scancel``) is forwarded too, but never requeues.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.artifacts import ArtifactStore
from orchestrator.artifacts.locking import file_lock
from orchestrator.errors import ExecutorUnavailable, OrchestratorError
from orchestrator.executors.base import Executor, SubmitReport
from orchestrator.fsutil import atomic_write_json, atomic_write_text, read_json
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.records import now, record_dict
from orchestrator.runner import EXIT_INTERRUPTED
from orchestrator.spec import Resources

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "slurm_templates" / "default.sbatch"
PLACEHOLDERS = ("directives", "study", "stage", "workdir", "command")
PLACEHOLDER_RE = re.compile(r"\{\{(\w+)\}\}")


class SlurmError(OrchestratorError):
    """A SLURM command failed; the message carries SLURM's own stderr."""


@dataclass(frozen=True)
class Submission:
    """One sbatch: the jobs of one stage that are not cached (array index = position in ``keys``)."""

    stage_id: str
    keys: tuple[str, ...]
    after: tuple[str, ...]  # stage ids of this submit's submissions it waits for
    resources: Resources

    @property
    def is_array(self) -> bool:
        return len(self.keys) > 1


@dataclass
class SubmitRecord:
    """What one submit queued: written next to the scripts, read by status and cancel."""

    dir: Path
    order: list[str] = field(default_factory=list)  # stage ids in submission order
    ids: dict[str, str] = field(default_factory=dict)  # stage id -> SLURM job id
    keys: dict[str, list[str]] = field(default_factory=dict)  # stage id -> job keys by array index
    after: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stage id -> stage ids it waits for


def group_submissions(plan: Plan, todo: Sequence[str]) -> list[Submission]:
    """Group the jobs to run by stage, in dependency order, with stage-level dependencies."""
    todo_set = set(todo)
    stage_of = {job.key: job.stage_id for job in plan.jobs}
    groups: dict[str, list[str]] = {}
    for job in plan.jobs:
        if job.key in todo_set:
            groups.setdefault(job.stage_id, []).append(job.key)
    out = []
    for sid, keys in groups.items():
        after = {stage_of[d] for k in keys for d in plan.by_key[k].deps if d in todo_set}
        out.append(Submission(sid, tuple(keys), tuple(sorted(after)), plan.study.executor.resources_for(sid)))
    return out


def sbatch_options(sub: Submission, study: str, log_dir: Path) -> dict[str, str]:
    """The #SBATCH options of a submission (everything but the dependency, known only at submit time)."""
    res = sub.resources
    opts: dict[str, str] = {
        "job_name": f"{study}.{sub.stage_id}",
        "output": str(log_dir / ("%x-%A_%a.out" if sub.is_array else "%x-%j.out")),
        "cpus_per_task": str(res.cpus),
        "kill_on_invalid_dep": "yes",
        "requeue": "",
        "open_mode": "append",  # a requeued job keeps what SLURM wrote before
        "signal": f"B:USR2@{res.signal_lead_s}",
    }
    if sub.is_array:
        opts["array"] = f"0-{len(sub.keys) - 1}"
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


def render_directives(options: dict[str, str]) -> str:
    """``#SBATCH`` lines via simple-slurm (which validates option names), every value quoted."""
    for key, value in options.items():
        if any(c in value for c in "\n\r\0"):
            raise OrchestratorError(f"sbatch option {key!r} contains a line break or NUL: {value!r}")
    from simple_slurm import Slurm

    try:
        slurm = Slurm(**{k: shlex.quote(v) if v else "" for k, v in sorted(options.items())})
    except SystemExit:
        raise OrchestratorError(f"unknown sbatch option among {sorted(options)}; see `man sbatch`") from None
    lines = slurm.script(shell="/bin/bash", convert=False).splitlines()
    return "\n".join(line.rstrip() for line in lines if line.startswith("#SBATCH"))


def render_command(python: str, list_path: Path, max_requeues: int = 3) -> str:
    """Run the job's runner in the background so the batch shell can forward signals; requeue when
    it checkpointed (exit 3) after USR2, the time-limit signal. The runner exits 3 only when a
    requeue resumes something: a stage that could not checkpoint exits 4, and after
    ``max_requeues`` restarts (``SLURM_RESTART_COUNT``) the job ends as timeout instead, so a job
    never requeues itself forever. Not after TERM: that is ``scancel`` (a cancelled job that
    requeued itself would run on) or SLURM's own preemption, which requeues by itself."""
    run = " ".join(
        shlex.quote(p)
        for p in (python, "-m", "orchestrator", "run-job", "--list", str(list_path), "--max-requeues", str(max_requeues))
    )
    threads = 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"'
    threads += ' MKL_NUM_THREADS="${MKL_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"'
    return f"""\
{threads}  # thread pools sized by the job's cpus, not the node's
{run} --index "${{SLURM_ARRAY_TASK_ID:-0}}" &
child=$!
requeue=0
trap 'requeue=1; kill -USR2 "$child" 2>/dev/null' USR2
trap 'kill -TERM "$child" 2>/dev/null' TERM
while true; do
  wait "$child"; rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if [ "$rc" -eq {EXIT_INTERRUPTED} ] && [ "$requeue" -eq 1 ]; then
  echo "checkpointed; requeueing ${{SLURM_JOB_ID}}"
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


def dependency_arg(ids: Sequence[str]) -> list[str]:
    """``--dependency=afterok:1:2`` (built here: simple-slurm joins lists with the wrong separator)."""
    return [f"--dependency=afterok:{':'.join(ids)}"] if ids else []


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(
        self,
        paths: StudyPaths,
        store: ArtifactStore,
        *,
        template: Path | None = None,
        dry_run: bool = False,
        echo: Callable[[str], None] = print,
        run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    ) -> None:
        super().__init__(paths, store)
        self.template = template or DEFAULT_TEMPLATE
        self.dry_run = dry_run
        self.echo = echo
        self._run = run

    def submit(self, plan: Plan, spec_path: Path, *, force: bool = False) -> SubmitReport:
        if self.dry_run:
            return self._submit(plan, spec_path, force)
        require_slurm()
        # One submit of a study at a time: a second one waits here, then finds the first one's jobs
        # queued and is refused, instead of queuing every job again.
        with file_lock(self.paths.root / "locks" / f"submit-{plan.study.name}.lock", timeout_s=SUBMIT_LOCK_TIMEOUT_S):
            self._refuse_while_queued(plan)
            return self._submit(plan, spec_path, force)

    def _refuse_while_queued(self, plan: Plan) -> None:
        """Refuse to submit while jobs of the study's latest submit are still queued or running:
        queuing them again would run them twice (the run lock would serialise them, not skip them)."""
        queued = queued_jobs(self.paths)
        if not queued:
            return
        alive = {sid: st for sid, (st, _) in query_states(list(queued.values()), self._run).items() if st in SLURM_ACTIVE}
        active = sorted({i.split("_")[0] for i in queued.values() if i in alive or i.split("_")[0] in alive})
        if active:
            study = plan.study.name
            raise SlurmError(
                f"study {study!r} has jobs still queued or running from its last submit (SLURM jobs {', '.join(active)}); "
                f"wait for them (python -m orchestrator status {study} --store {self.paths.root}) or cancel them "
                f"(python -m orchestrator cancel {study} --store {self.paths.root}), then submit again"
            )

    def _submit(self, plan: Plan, spec_path: Path, force: bool) -> SubmitReport:
        todo, cached = self.prepare(plan, spec_path, force, job_files=False)
        report = SubmitReport(cached=sorted(cached))
        if cached:
            self.echo(f"{len(cached)} of {len(plan.jobs)} jobs cached (outputs already committed)")
        if not todo:
            self.echo("nothing to submit")
            return report
        record = self._write_scripts(plan, group_submissions(plan, todo), spec_path)
        if self.dry_run:
            self._print_dry_run(record)
            return report
        self._submit_all(record)  # queued jobs have no state file until they run: status reads submission.json
        report.submitted = [k for sid in record.order for k in record.keys[sid]]
        self.echo(
            f"queued {len(report.submitted)} jobs in {len(record.order)} sbatch submissions; "
            f"follow with: python -m orchestrator status {plan.study.name} --store {self.paths.root}"
        )
        return report

    def _write_scripts(self, plan: Plan, subs: list[Submission], spec_path: Path) -> SubmitRecord:
        stamp = now().replace(":", "").replace("+0000", "Z")  # seconds: unique with the suffix
        record = SubmitRecord(self.paths.dir / "slurm" / f"{stamp}-{uuid.uuid4().hex[:8]}")
        template = self.template.read_text(encoding="utf-8")
        spec_hash = plan.study.spec_hash()
        for n, sub in enumerate(subs):
            list_path = record.dir / f"{n:02d}-{sub.stage_id}.jobs.json"
            # the job records themselves, one file per stage (not one per job): the array task picks its own
            records = [record_dict(plan.by_key[k], plan, self.paths.root, spec_hash, spec_path) for k in sub.keys]
            atomic_write_json(list_path, records, durable=False)
            script = render_script(
                template,
                directives=render_directives(sbatch_options(sub, plan.study.name, record.dir)),
                study=plan.study.name,
                stage=sub.stage_id,
                workdir=Path.cwd(),
                command=render_command(sys.executable, list_path, sub.resources.max_requeues),
            )
            atomic_write_text(record.dir / f"{n:02d}-{sub.stage_id}.sbatch", script)
            record.order.append(sub.stage_id)
            record.keys[sub.stage_id] = list(sub.keys)
            record.after[sub.stage_id] = sub.after
        self._save(record)
        return record

    def _submit_all(self, record: SubmitRecord) -> None:
        for n, sid in enumerate(record.order):
            deps = [record.ids[a] for a in record.after[sid]]
            cmd = ["sbatch", "--parsable", *dependency_arg(deps), str(record.dir / f"{n:02d}-{sid}.sbatch")]
            result = self._run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                cancelled = self._cancel(list(record.ids.values()))
                self._save(record)
                raise SlurmError(
                    f"sbatch failed for stage {sid!r} (exit {result.returncode}): {result.stderr.strip()}\n"
                    f"command: {shlex.join(cmd)}\ncancelled the {len(cancelled)} submissions already queued by this submit"
                )
            record.ids[sid] = result.stdout.strip().split(";")[0]
            self.echo(f"sbatch {sid}: job {record.ids[sid]}" + (f" after {','.join(deps)}" if deps else ""))
        self._save(record)

    def _cancel(self, ids: list[str]) -> list[str]:
        if ids:
            self._run(["scancel", *ids], capture_output=True, text=True)
        return ids

    def _save(self, record: SubmitRecord) -> None:
        atomic_write_json(
            record.dir / "submission.json",
            {
                "order": record.order,
                "ids": record.ids,
                "keys": record.keys,
                "after": {sid: list(record.after[sid]) for sid in record.order},
                "submitted_at": now(),
            },
        )
        atomic_write_json(self.paths.dir / "slurm" / "latest.json", {"dir": str(record.dir)})

    def _print_dry_run(self, record: SubmitRecord) -> None:
        self.echo(f"dry run: nothing submitted; {len(record.order)} scripts written to {record.dir}")
        for n, sid in enumerate(record.order):
            script = record.dir / f"{n:02d}-{sid}.sbatch"
            cmd = ["sbatch", "--parsable", *dependency_arg([f"<{a}>" for a in record.after[sid]]), str(script)]
            self.echo(f"\n# {n + 1}. stage {sid}: {len(record.keys[sid])} jobs\n$ {' '.join(cmd)}")
            self.echo(script.read_text(encoding="utf-8").rstrip())


SUBMIT_LOCK_TIMEOUT_S = 600.0  # another submit of the study queuing thousands of jobs
# squeue/sacct states of a job that will still run (or is running)
SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def require_slurm() -> None:
    missing = [c for c in ("sbatch", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        raise ExecutorUnavailable(
            f"executor 'slurm' needs SLURM's commands, and {', '.join(missing)} is not on PATH on this machine; "
            "submit from a cluster login node, use --executor local, or --dry-run to only write the scripts"
        )


def latest_submission(paths: StudyPaths) -> dict[str, object] | None:
    pointer = paths.dir / "slurm" / "latest.json"
    if not pointer.exists():
        return None
    return read_json(Path(read_json(pointer)["dir"]) / "submission.json")


def query_states(
    job_ids: Sequence[str], run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
) -> dict[str, tuple[str, str]]:
    """SLURM job id (``123`` or ``123_4``) -> (state, reason), from one ``squeue`` call for all jobs
    plus one ``sacct`` call for jobs that left the queue. Without accounting, sacct fails and
    finished jobs are simply absent (the runner's own state records cover them)."""
    if not job_ids:
        return {}
    ids = ",".join(sorted({i.split("_")[0] for i in job_ids}))
    states: dict[str, tuple[str, str]] = {}
    sq = run(["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T|%r"], capture_output=True, text=True)
    if sq.returncode == 0:
        for line in sq.stdout.splitlines():
            jid, state, reason = (line.split("|") + ["", ""])[:3]
            states[jid.strip()] = (state.strip(), "" if reason.strip() == "None" else reason.strip())
    if shutil.which("sacct"):
        sa = run(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State,Reason"], capture_output=True, text=True)
        if sa.returncode == 0:
            for line in sa.stdout.splitlines():
                jid, state, reason = (line.split("|") + ["", ""])[:3]
                states.setdefault(jid.strip(), (state.split()[0] if state else "", "" if reason == "None" else reason))
    return states


def queued_jobs(paths: StudyPaths) -> dict[str, str]:
    """Job key -> SLURM id (``123`` or ``123_4``) of every job the study's latest submit queued."""
    sub = latest_submission(paths) or {}
    ids, keys = sub.get("ids", {}), sub.get("keys", {})
    out = {}
    for sid, stage_keys in keys.items():  # type: ignore[union-attr]
        if sid in ids:
            for i, key in enumerate(stage_keys):
                out[key] = f"{ids[sid]}_{i}" if len(stage_keys) > 1 else ids[sid]
    return out


def cancel_study(paths: StudyPaths, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> list[str]:
    """scancel every submission of the study's latest submit; return the ids cancelled."""
    sub = latest_submission(paths)
    if sub is None:
        raise OrchestratorError(f"study {paths.study!r} has no SLURM submission under {paths.root}")
    ids = list(sub["ids"].values())  # type: ignore[union-attr]
    if ids:
        require_slurm()
        result = run(["scancel", *ids], capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmError(f"scancel failed: {result.stderr.strip()}")
    return ids
