"""Queue a whole study on SLURM in one submit, and return.

Jobs become job arrays, and each job waits for exactly the upstream jobs it needs, as under the
local executor: a failed job cancels its own dependents (``--kill-on-invalid-dep=yes``) and
nothing else. ``layout`` groups a stage's jobs into arrays: jobs with the same resources and the
same upstream tasks share one (``afterok``); a job that needs one task of an upstream array takes
that task's array index, so its array waits task by task (``aftercorr``). Arrays are split at the
controller's MaxArraySize, a submit that would overflow MaxJobCount is refused before anything is
queued, ``executor.slurm.array_parallelism`` throttles arrays (``--array=...%N``), and every sbatch
call has a timeout. Scripts come from a template (``slurm_templates/default.sbatch`` or the
spec's own); ``#SBATCH`` lines are built with simple-slurm, every value ``shlex``-quoted, and no
spec value ever reaches a shell: parameters travel in the job records, never in the script.

Preemption and time limits: ``--signal=B:USR2@<signal_lead_s>`` reaches the batch shell, which
forwards it to the runner; a stage that checkpoints exits with code 3 and the script requeues the
job, whose next start resumes from the checkpoint, at most ``max_requeues`` times; after that, or
for a stage that cannot checkpoint, the job ends as ``timeout`` with a message to raise
``time_min``. TERM (``scancel``) is forwarded too, but never requeues.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.artifacts import ArtifactStore
from orchestrator.artifacts.locking import file_lock
from orchestrator.executors.base import Executor, StatusView, SubmitReport
from orchestrator.fsutil import atomic_write_json, atomic_write_text
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan
from orchestrator.records import JobState, record_dict
from orchestrator.resources import parse_selector
from orchestrator.spec import Study

from .layout import Dep, Submission, array_spec, layout, waves
from .queue import (
    QUERY_TIMEOUT_S,
    SLURM_ACTIVE,
    SLURM_ENDED,
    ClusterLimits,
    QueueView,
    SlurmError,
    SubmitRecord,
    active_ids,
    cancel_study,
    cluster_limits,
    every_submission,
    latest_submission,
    missing_commands,
    query_states,
    queued_jobs,
    require_slurm,
    save_submission,
    stamped_folder,
    submitted_ids,
    track_submission,
)
from .script import (
    DEFAULT_TEMPLATE,
    afterok,
    dependency_arg,
    render_command,
    render_directives,
    render_script,
    render_signal_loop,
    sbatch_options,
)

__all__ = [
    "DEFAULT_TEMPLATE", "QUERY_TIMEOUT_S", "SLURM_ACTIVE", "SLURM_ENDED", "ClusterLimits", "Dep", "QueueView",
    "SlurmError", "SlurmExecutor", "SubmitRecord", "Submission", "active_ids", "afterok", "array_spec", "cancel_study",
    "cluster_limits", "dependency_arg", "every_submission", "latest_submission", "layout", "query_states", "queued_jobs",
    "render_command", "render_directives", "render_script", "render_signal_loop", "require_slurm", "save_submission",
    "sbatch_options", "stamped_folder", "submitted_ids", "track_submission", "waves",
]  # fmt: skip

SBATCH_AT_ONCE = 8  # sbatch calls in flight at once: a wave of 100 arrays costs 13 round trips, not 100
SUBMIT_LOCK_TIMEOUT_S = 600.0  # another submit of the study queuing thousands of jobs


class SlurmExecutor(Executor):
    """Queues a plan on SLURM in one submit (job arrays, per-task dependencies) and returns; the
    jobs record their own states as they run; see the package docstring."""

    name = "slurm"
    label = "SLURM"

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

    writes_scripts = True

    @classmethod
    def from_study(cls, study: Study, paths: StudyPaths, store: ArtifactStore, *, dry_run: bool = False) -> SlurmExecutor:
        return cls(paths, store, template=study.executor.slurm.template, dry_run=dry_run)

    @classmethod
    def spec_problems(cls, study: Study) -> list[tuple[tuple[str | int, ...], str]]:
        """A time limit must leave room for the checkpoint signal sent ``signal_lead_s`` before it."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for key in study.executor.resources:
            stage_id, pairs = parse_selector(key)
            res = study.executor.resources_for(stage_id, pairs)
            if res.time_min is not None and res.time_min * 60 <= res.signal_lead_s:
                problems.append((
                    ("executor", "resources", key, "time_min"),
                    f"time_min ({res.time_min} min) must be longer than signal_lead_s ({res.signal_lead_s} s), which asks "
                    "the stage to checkpoint before the limit: raise time_min or lower signal_lead_s",
                ))  # fmt: skip
        return problems

    @classmethod
    def unavailable(cls) -> str | None:
        return missing_commands()

    @classmethod
    def warnings(cls, plan: Plan) -> list[str]:
        from .warnings import resource_warnings

        return resource_warnings(plan, os.environ)

    @classmethod
    def status(cls, paths: StudyPaths, states: Mapping[str, JobState | None]) -> StatusView:
        """Jobs this backend queued: the scheduler's state and pending reason (one squeue, one
        sacct); queued jobs that have not started recorded nothing themselves."""
        queued = queued_jobs(paths)
        ids = {key: s.external_id for key, s in states.items() if s and s.executor == cls.name and s.external_id}
        ids.update({key: queued[key] for key, s in states.items() if s is None and key in queued})
        if not ids:
            return StatusView()
        view = query_states(list(ids.values())) if shutil.which("squeue") else QueueView()
        rows: dict[str, tuple[str, str]] = {}
        for key, job_id in ids.items():
            state = states.get(key)
            name: str = state.state if state else "queued"
            sched, reason = view.states.get(job_id, ("", ""))
            if name in ("queued", "running") and sched in SLURM_ENDED:  # ended without recording how
                name = "cancelled" if sched == "CANCELLED" else "failed"
            rows[key] = (name, f"slurm {job_id}" + (f" {sched}" if sched else "") + (f" ({reason})" if reason else ""))
        warning = f"{view.unreachable}; below, each job's state as it last recorded it" if view.unreachable else None
        return StatusView(rows, warning)

    @classmethod
    def cancel(cls, paths: StudyPaths) -> list[str] | None:
        return cancel_study(paths)

    def submit(self, plan: Plan, spec_path: Path, *, force: bool = False) -> SubmitReport:
        if self.dry_run:
            return self._submit(plan, spec_path, force, ClusterLimits())
        require_slurm()
        # One submit of a study at a time: a second one waits here, then finds the first one's jobs
        # queued and is refused, instead of queuing every job again.
        with file_lock(self.paths.root / "locks" / f"submit-{plan.study.name}.lock", timeout_s=SUBMIT_LOCK_TIMEOUT_S):
            self._refuse_while_queued(plan)
            return self._submit(plan, spec_path, force, cluster_limits(self._run, plan.study.executor.slurm.sbatch_timeout_s))

    def _refuse_while_queued(self, plan: Plan) -> None:
        """Refuse to submit while jobs of an earlier submit of the study are still queued or
        running: queuing them again would run them twice (the run lock would serialise them, not
        skip them)."""
        ids = submitted_ids(self.paths, every=True)
        active = active_ids(ids, self._run) if ids else []
        if active:
            study = plan.study.name
            raise SlurmError(
                f"study {study!r} has jobs still queued or running from an earlier submit (SLURM jobs {', '.join(active)}); "
                f"wait for them (python -m orchestrator status {study} --store {self.paths.root}) or cancel them "
                f"(python -m orchestrator cancel {study} --store {self.paths.root}), then submit again"
            )

    def _submit(self, plan: Plan, spec_path: Path, force: bool, limits: ClusterLimits) -> SubmitReport:
        todo, cached = self.prepare(plan, spec_path, force, job_files=False)
        report = SubmitReport(cached=sorted(cached))
        if cached:
            self.echo(f"{len(cached)} of {len(plan.jobs)} jobs cached (outputs already committed)")
        if not todo:
            self.echo("nothing to submit")
            return report
        record = self._write_scripts(plan, layout(plan, todo, limits.max_array_size), spec_path)
        if self.dry_run:
            self._print_dry_run(record)
            return report
        self._check_room(len(todo), limits, plan.study.executor.slurm.sbatch_timeout_s)
        self._submit_all(record, plan.study.executor.slurm.sbatch_timeout_s)  # queued jobs have no state file until they run
        report.submitted = [k for sub in record.subs for k in sub.keys]
        self.echo(
            f"queued {len(report.submitted)} jobs in {len(record.subs)} sbatch submissions; "
            f"follow with: python -m orchestrator status {plan.study.name} --store {self.paths.root}"
        )
        return report

    def _check_room(self, jobs: int, limits: ClusterLimits, timeout_s: float) -> None:
        """Refuse, before queuing anything, a submit that cannot fit under the cluster's MaxJobCount
        (sbatch would otherwise block, retrying, once the queue is full). The queue is only counted
        (one squeue of every job on the cluster) for a submit of a tenth of MaxJobCount or more."""
        if jobs < limits.max_job_count // 10:
            return
        try:
            result = self._run(["squeue", "-h", "-r", "-t", "all", "-o", "%i"], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmError(f"the SLURM controller did not answer squeue within {timeout_s:g} s; submitted nothing") from None
        held = len(result.stdout.split()) if result.returncode == 0 else 0
        if held + jobs > limits.max_job_count:
            raise SlurmError(
                f"this submit queues {jobs} jobs, and the cluster holds at most MaxJobCount={limits.max_job_count} "
                f"(it holds {held} now, finished ones included until MinJobAge passes); submit when the queue has room, "
                "or run fewer jobs (a smaller matrix or sweep)"
            )

    def _write_scripts(self, plan: Plan, subs: list[Submission], spec_path: Path) -> SubmitRecord:
        record = SubmitRecord(stamped_folder(self.paths.dir / "slurm"), subs)
        template = self.template.read_text(encoding="utf-8")
        spec_hash = plan.study.spec_hash()
        parallelism = plan.study.executor.slurm.array_parallelism
        for n, sub in enumerate(subs):
            # the job records themselves, one file per submission (not one per job), by array index
            records = {str(i): record_dict(plan.by_key[k], plan, self.paths.root, spec_hash, spec_path) for i, k in sub.tasks}
            atomic_write_json(record.job_list(n), records, durable=False, compact=True)
            script = render_script(
                template,
                directives=render_directives(sbatch_options(sub, plan.study.name, record.dir, parallelism)),
                study=plan.study.name,
                stage=sub.stage_id,
                workdir=Path.cwd(),
                command=render_command(sys.executable, record.job_list(n), sub.resources.max_requeues),
            )
            atomic_write_text(record.script(n), script)
        self._save(record)
        return record

    def _submit_all(self, record: SubmitRecord, timeout_s: float) -> None:
        """sbatch every submission, a wave at a time: those whose dependencies are all queued go
        together, ``SBATCH_AT_ONCE`` calls at a time (each costs the controller's round trip)."""
        for wave in waves(record.subs):
            with ThreadPoolExecutor(max_workers=min(SBATCH_AT_ONCE, len(wave))) as pool:
                outcomes = list(pool.map(lambda n: self._sbatch(record, n, timeout_s), wave))
            for n, (job_id, _, _) in zip(wave, outcomes, strict=True):
                if job_id:
                    record.ids[n] = job_id
            failed = [(n, problem, cmd) for n, (_, problem, cmd) in zip(wave, outcomes, strict=True) if problem]
            if failed:
                n, problem, cmd = failed[0]
                cancelled = self._cancel(list(record.ids.values()))
                self._save(record)
                raise SlurmError(
                    f"sbatch failed for stage {record.subs[n].stage_id!r} {problem}\ncommand: {shlex.join(cmd)}\n"
                    f"cancelled the {len(cancelled)} submissions already queued by this submit"
                )
        for sid in dict.fromkeys(sub.stage_id for sub in record.subs):
            self._echo_stage(record, [n for n, sub in enumerate(record.subs) if sub.stage_id == sid])
        self._save(record)

    def _sbatch(self, record: SubmitRecord, n: int, timeout_s: float) -> tuple[str | None, str | None, list[str]]:
        """(job id, None) or (None, what went wrong), and the command."""
        cmd = ["sbatch", "--parsable", *dependency_arg(record.conditions(n)), str(record.script(n))]
        try:
            result = self._run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            problem = (
                f"did not return within {timeout_s:g} s (executor.slurm.sbatch_timeout_s): the controller is unreachable "
                "or busy, or the queue is full (MaxJobCount) and sbatch keeps retrying"
            )
            return None, problem, cmd
        if result.returncode != 0:
            return None, f"(exit {result.returncode}): {result.stderr.strip()}", cmd
        return result.stdout.strip().split(";")[0], None, cmd

    def _echo_stage(self, record: SubmitRecord, subs: list[int]) -> None:
        """One line per stage: its job ids, and what they wait for."""
        jobs = sum(len(record.subs[n].tasks) for n in subs)
        ids = ", ".join(record.ids[n] for n in subs[:6]) + (", ..." if len(subs) > 6 else "")
        after = sorted({c.split(":")[0] for n in subs for c in record.conditions(n)})
        what = f"{jobs} jobs in {len(subs)} submissions (jobs {ids})" if len(subs) > 1 else f"job {ids}"
        waits = f" after their upstream jobs ({', '.join(after)})" if after else ""
        self.echo(f"sbatch {record.subs[subs[0]].stage_id}: {what}{waits}")

    def _cancel(self, ids: list[str]) -> list[str]:
        if ids:
            self._run(["scancel", *ids], capture_output=True, text=True)
        return list(ids)

    def _save(self, record: SubmitRecord) -> None:
        save_submission(self.paths, record.dir, record.as_json())

    def _print_dry_run(self, record: SubmitRecord) -> None:
        self.echo(f"dry run: nothing submitted; {len(record.subs)} scripts written to {record.dir}")
        placeholders = record.placeholders()
        for n, sub in enumerate(record.subs):
            cmd = ["sbatch", "--parsable", *dependency_arg(record.conditions(n, placeholders)), str(record.script(n))]
            self.echo(f"\n# {placeholders[n]}: {len(sub.tasks)} jobs of stage {sub.stage_id}\n$ {' '.join(cmd)}")
            self.echo(record.script(n).read_text(encoding="utf-8").rstrip())
