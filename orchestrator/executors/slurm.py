"""Queue a whole study on SLURM in one submit, and return.

Jobs become job arrays, and each job waits for exactly the upstream jobs it needs, as under the
local executor: a failed job cancels its own dependents (``--kill-on-invalid-dep=yes``) and
nothing else. ``layout`` groups a stage's jobs into arrays: jobs with the same resources and the
same upstream tasks share one (``afterok``); a job that needs one task of an upstream array takes
that task's array index, so its array waits task by task (``aftercorr``). Arrays are split at the
controller's MaxArraySize, a submit that would overflow MaxJobCount is refused before anything is
queued, ``executor.array_parallelism`` throttles arrays (``--array=...%N``), and every sbatch
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

import functools
import math
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
class Dep:
    """What one sbatch waits for in an earlier sbatch of the same submit (by its position
    ``unit``): all of its tasks, only the ``tasks`` listed, or, with ``corr``, each task on the
    task of the same index there (``aftercorr``)."""

    unit: int
    tasks: tuple[int, ...] = ()  # () and not corr: every task
    corr: bool = False

    def render(self, job_id: str) -> str:
        if self.corr:
            return f"aftercorr:{job_id}"
        return "afterok:" + (":".join(f"{job_id}_{t}" for t in self.tasks) if self.tasks else job_id)


@dataclass(frozen=True)
class Submission:
    """One sbatch: jobs of one stage with the same resources and the same kind of dependencies.
    ``tasks``: (array index, job key); a plain job (not ``array``) has the one index 0."""

    stage_id: str
    tasks: tuple[tuple[int, str], ...]
    deps: tuple[Dep, ...]
    resources: Resources
    array: bool

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for _, key in self.tasks)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(i for i, _ in self.tasks)


def layout(plan: Plan, todo: Sequence[str], max_array_size: int = 1001) -> list[Submission]:
    """Group the jobs to run into sbatch submissions whose dependencies are exactly the local
    executor's: a job waits for its own upstream jobs, so one failed job cancels its dependents
    and nothing else.

    Jobs of a stage share an array when they have the same resources and depend on the same
    upstream tasks, or each on "its own" task of one upstream array: then the job takes that
    task's array index and the array waits with ``aftercorr`` (task i after task i). Where
    several jobs would take one index (a fan-out), each takes it in a further array, or, when
    that makes fewer arrays, the jobs following one task form an array waiting for it. Arrays
    hold at most ``max_array_size`` tasks (SLURM's MaxArraySize bounds the index); a lone job
    is a plain job waiting on the exact tasks it needs.
    """
    todo_set = set(todo)
    where: dict[str, tuple[int, int]] = {}  # job key -> (submission, array index) of jobs placed so far
    subs: list[Submission] = []
    every: list[frozenset[int]] = []  # the array indices of subs[i]
    by_stage: dict[str, list[str]] = {}
    for job in plan.jobs:
        if job.key in todo_set:
            by_stage.setdefault(job.stage_id, []).append(job.key)
    for sid, keys in by_stage.items():
        groups: dict[tuple[str, frozenset[int], tuple[Dep, ...]], list[tuple[int, str]]] = {}
        resources: dict[str, Resources] = {}
        for key in keys:
            job = plan.by_key[key]
            res = plan.study.executor.resources_for(sid, job.point)
            res_id = res.model_dump_json()
            resources[res_id] = res
            upstream: dict[int, set[int]] = {}
            for dep in job.deps:
                if dep in where:
                    unit, index = where[dep]
                    upstream.setdefault(unit, set()).add(index)
            corr, index = _corresponding(subs, upstream)
            fixed = tuple(
                Dep(u, () if tasks == every[u] else tuple(sorted(tasks)))
                for u, tasks in sorted(upstream.items())
                if u not in corr
            )
            groups.setdefault((res_id, corr, fixed), []).append((index, key))
        for (res_id, corr, fixed), members in groups.items():
            for sub in _arrays(sid, members, corr, fixed, resources[res_id], max_array_size):
                subs.append(sub)
                every.append(frozenset(sub.indices))
                where.update((key, (len(subs) - 1, index)) for index, key in sub.tasks)
    return subs


def _corresponding(subs: Sequence[Submission], upstream: dict[int, set[int]]) -> tuple[frozenset[int], int]:
    """The upstream arrays a job can follow task by task (it needs exactly one task of each,
    all at the same index), and that index; (empty, -1) when there is none."""
    single = sorted((u, next(iter(t))) for u, t in upstream.items() if len(t) == 1 and subs[u].array)
    if not single:
        return frozenset(), -1
    index = single[0][1]
    return frozenset(u for u, i in single if i == index), index


def _arrays(
    sid: str, members: list[tuple[int, str]], corr: frozenset[int], fixed: tuple[Dep, ...], res: Resources, max_size: int
) -> list[Submission]:
    """The submissions of one group of a stage's jobs (see ``layout``): ``members`` are
    (index of the upstream task followed, job key), the index -1 where there is none."""
    if not corr:
        return _chunks(sid, [key for _, key in members], fixed, res, max_size)
    following: dict[int, list[str]] = {}
    for index, key in members:
        following.setdefault(index, []).append(key)
    rounds = max(len(keys) for keys in following.values())
    per_task = sum(math.ceil(len(keys) / max_size) for keys in following.values())
    out: list[Submission] = []
    if per_task < rounds:  # a wide fan-out: one array per upstream task, waiting for that task
        for index, keys in following.items():
            out += _chunks(sid, keys, _sorted(fixed + tuple(Dep(u, (index,)) for u in corr)), res, max_size)
        return out
    for n in range(rounds):  # the n-th job following each task goes into the n-th array
        tasks = sorted((index, keys[n]) for index, keys in following.items() if len(keys) > n)
        if len(tasks) == 1:  # a plain job waits on the exact task it follows
            (index, key), = tasks
            out += _chunks(sid, [key], _sorted(fixed + tuple(Dep(u, (index,)) for u in corr)), res, max_size)
        else:
            out.append(Submission(sid, tuple(tasks), _sorted(fixed + tuple(Dep(u, corr=True) for u in corr)), res, array=True))
    return out


def _chunks(sid: str, keys: list[str], deps: tuple[Dep, ...], res: Resources, max_size: int) -> list[Submission]:
    """Arrays of at most ``max_size`` jobs, indexed from 0 (a lone job: a plain job) with the same dependencies."""
    parts = [keys[i : i + max_size] for i in range(0, len(keys), max_size)]
    return [Submission(sid, tuple(enumerate(part)), deps, res, array=len(part) > 1) for part in parts]


def _sorted(deps: tuple[Dep, ...]) -> tuple[Dep, ...]:
    return tuple(sorted(deps, key=lambda d: d.unit))


def waves(subs: Sequence[Submission]) -> list[list[int]]:
    """Submission numbers in waves: each after every submission it waits for (an sbatch needs the
    job ids of its dependencies), the submissions of a wave independent of each other."""
    level: list[int] = []
    for sub in subs:
        level.append(1 + max((level[d.unit] for d in sub.deps), default=-1))
    return [[n for n, lv in enumerate(level) if lv == w] for w in range(max(level, default=-1) + 1)]


def array_spec(indices: Sequence[int], parallelism: int | None = None) -> str:
    """``--array`` value: sorted indices as ranges (``0-4,7,9-10``), with ``%N`` to run at most N at once."""
    parts: list[str] = []
    ordered = sorted(indices)
    start = prev = ordered[0]
    for i in [*ordered[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + (f"%{parallelism}" if parallelism else "")


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


def dependency_arg(conditions: Sequence[str]) -> list[str]:
    """``--dependency=afterok:1:2,aftercorr:3`` (every condition must hold); built here, not by
    simple-slurm, which joins lists with the wrong separator."""
    return [f"--dependency={','.join(conditions)}"] if conditions else []


def afterok(ids: Sequence[str]) -> list[str]:
    """The condition "after every one of ``ids`` succeeded", none for no ids."""
    return [f"afterok:{':'.join(ids)}"] if ids else []


@dataclass(frozen=True)
class ClusterLimits:
    """What the controller accepts (``scontrol show config``); SLURM's defaults when it cannot be asked."""

    max_array_size: int = 1001
    max_job_count: int = 10_000

    @classmethod
    def parse(cls, config: str) -> ClusterLimits:
        values = dict(re.findall(r"^(MaxArraySize|MaxJobCount)\s*=\s*(\d+)", config, re.MULTILINE))
        default = cls()
        return cls(
            int(values.get("MaxArraySize", default.max_array_size)), int(values.get("MaxJobCount", default.max_job_count))
        )


@dataclass
class SubmitRecord:
    """What one submit queued, written next to its scripts and read by status and cancel: per
    submission its stage, script, SLURM job id (once queued), tasks and dependencies."""

    dir: Path
    subs: list[Submission] = field(default_factory=list)
    ids: dict[int, str] = field(default_factory=dict)  # SLURM job id of subs[i], for those queued so far

    def script(self, n: int) -> Path:
        return self.dir / f"{n:03d}-{self.subs[n].stage_id}.sbatch"

    def job_list(self, n: int) -> Path:
        return self.dir / f"{n:03d}-{self.subs[n].stage_id}.jobs.json"

    def conditions(self, n: int, ids: Sequence[str] | Mapping[int, str] | None = None) -> list[str]:
        """The ``--dependency`` conditions of ``subs[n]``, naming the others by ``ids`` (default: their job ids)."""
        ids = self.ids if ids is None else ids
        return [d.render(ids[d.unit]) for d in self.subs[n].deps]

    def placeholders(self) -> list[str]:
        """A name per submission for when there are no job ids (yet): ``<stage>``, or ``<stage.k>``
        for a stage of several submissions."""
        counts = Counter(sub.stage_id for sub in self.subs)
        seen: Counter[str] = Counter()
        out = []
        for sub in self.subs:
            seen[sub.stage_id] += 1
            out.append(f"<{sub.stage_id}>" if counts[sub.stage_id] == 1 else f"<{sub.stage_id}.{seen[sub.stage_id]}>")
        return out

    def as_json(self) -> dict[str, object]:
        return {
            "submissions": [
                {
                    "stage": sub.stage_id,
                    "script": self.script(n).name,
                    "id": self.ids.get(n),
                    "array": sub.array,
                    "tasks": [[i, key] for i, key in sub.tasks],
                    "after": self.conditions(n, self.placeholders()),
                }
                for n, sub in enumerate(self.subs)
            ],
            "submitted_at": now(),
        }


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
            return self._submit(plan, spec_path, force, ClusterLimits())
        require_slurm()
        # One submit of a study at a time: a second one waits here, then finds the first one's jobs
        # queued and is refused, instead of queuing every job again.
        with file_lock(self.paths.root / "locks" / f"submit-{plan.study.name}.lock", timeout_s=SUBMIT_LOCK_TIMEOUT_S):
            self._refuse_while_queued(plan)
            return self._submit(plan, spec_path, force, cluster_limits(self._run, plan.study.executor.sbatch_timeout_s))

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
        self._check_room(len(todo), limits, plan.study.executor.sbatch_timeout_s)
        self._submit_all(record, plan.study.executor.sbatch_timeout_s)  # queued jobs have no state file until they run
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
        stamp = now().replace(":", "").replace("+0000", "Z")  # seconds: unique with the suffix
        record = SubmitRecord(self.paths.dir / "slurm" / f"{stamp}-{uuid.uuid4().hex[:8]}", subs)
        template = self.template.read_text(encoding="utf-8")
        spec_hash = plan.study.spec_hash()
        parallelism = plan.study.executor.array_parallelism
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
                f"did not return within {timeout_s:g} s (executor.sbatch_timeout_s): the controller is unreachable "
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
        atomic_write_json(record.dir / "submission.json", record.as_json(), compact=True)
        track_submission(self.paths, record.dir)

    def _print_dry_run(self, record: SubmitRecord) -> None:
        self.echo(f"dry run: nothing submitted; {len(record.subs)} scripts written to {record.dir}")
        placeholders = record.placeholders()
        for n, sub in enumerate(record.subs):
            cmd = ["sbatch", "--parsable", *dependency_arg(record.conditions(n, placeholders)), str(record.script(n))]
            self.echo(f"\n# {placeholders[n]}: {len(sub.tasks)} jobs of stage {sub.stage_id}\n$ {' '.join(cmd)}")
            self.echo(record.script(n).read_text(encoding="utf-8").rstrip())


SBATCH_AT_ONCE = 8  # sbatch calls in flight at once: a wave of 100 arrays costs 13 round trips, not 100
SUBMIT_LOCK_TIMEOUT_S = 600.0  # another submit of the study queuing thousands of jobs
QUERY_TIMEOUT_S = 5.0  # squeue/sacct/scontrol for status: a controller slower than this counts as unreachable
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


def cluster_limits(run: Callable[..., subprocess.CompletedProcess[str]], timeout_s: float) -> ClusterLimits:
    """The controller's limits; refuses to go on when the controller does not answer."""
    try:
        result = run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"the SLURM controller did not answer `scontrol show config` within {timeout_s:g} s (executor.sbatch_timeout_s); "
            "nothing was submitted. Check `sinfo`, then submit again"
        ) from None
    if result.returncode != 0:
        raise SlurmError(f"`scontrol show config` failed: {result.stderr.strip()}; nothing was submitted")
    return ClusterLimits.parse(result.stdout)


def latest_submission(paths: StudyPaths) -> list[dict[str, Any]] | None:
    """The submissions of the study's latest submit (see ``SubmitRecord.as_json``), or None."""
    pointer = paths.dir / "slurm" / "latest.json"
    if not pointer.exists():
        return None
    return _submissions(read_json(Path(read_json(pointer)["dir"]) / "submission.json"))


def track_submission(paths: StudyPaths, folder: Path) -> None:
    """Make ``folder`` (holding a ``submission.json``) the study's latest submit, and list it among
    all of its submits (``every_submission``): status reads the latest, cancel and the refusal to
    submit twice read them all."""
    index = paths.dir / "slurm" / "submits.json"
    folders = read_json(index) if index.exists() else []
    if str(folder) not in folders:
        atomic_write_json(index, [*folders, str(folder)])
    atomic_write_json(paths.dir / "slurm" / "latest.json", {"dir": str(folder)})


def every_submission(paths: StudyPaths) -> list[dict[str, Any]]:
    """The submissions of every submit of the study under this store, oldest first."""
    index = paths.dir / "slurm" / "submits.json"
    if index.exists():
        folders = [Path(f) for f in read_json(index)]
    else:  # a store from before the index: the executor's own folders
        folders = sorted(d.parent for d in (paths.dir / "slurm").glob("*/submission.json"))
    out: list[dict[str, Any]] = []
    for folder in folders:
        if (folder / "submission.json").exists():
            out += _submissions(read_json(folder / "submission.json"))
    return out


def _submissions(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if "submissions" in doc:
        return list(doc["submissions"])
    # written before per-task dependencies: one submission per stage, array index = position
    return [
        {"stage": sid, "id": doc["ids"].get(sid), "array": len(doc["keys"][sid]) > 1, "tasks": list(enumerate(doc["keys"][sid]))}
        for sid in doc["order"]
    ]


def submitted_ids(paths: StudyPaths, *, every: bool = False) -> list[str]:
    """SLURM job ids (arrays as one id each) of the study's latest submit, or of ``every`` one."""
    subs = every_submission(paths) if every else latest_submission(paths) or []
    return [str(sub["id"]) for sub in subs if sub.get("id")]


def active_ids(ids: Sequence[str], run: Callable[..., subprocess.CompletedProcess[str]]) -> list[str]:
    """Those of ``ids`` (job or array ids) with a task still queued or running; refuses to guess
    when the controller does not answer."""
    view = query_states(ids, run)
    if view.unreachable:
        raise SlurmError(f"cannot tell which of the study's jobs still run: {view.unreachable}")
    return sorted({i.split("_")[0] for i, (state, _) in view.states.items() if state in SLURM_ACTIVE}, key=int)


@dataclass
class QueueView:
    """What the scheduler says of some jobs: job id (``123`` or ``123_4``) -> (state, reason)."""

    states: dict[str, tuple[str, str]] = field(default_factory=dict)
    unreachable: str | None = None  # why the controller could not be asked, if it could not


def query_states(
    job_ids: Sequence[str],
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    timeout_s: float = QUERY_TIMEOUT_S,
) -> QueueView:
    """One ``squeue`` call for all jobs plus one ``sacct`` call for jobs that left the queue.
    Without accounting, sacct fails and finished jobs are simply absent (the runner's own state
    records cover them). A controller that does not answer within ``timeout_s`` is reported in
    ``unreachable`` instead of being waited for."""
    view = QueueView()
    if not job_ids:
        return view
    ids = ",".join(sorted({i.split("_")[0] for i in job_ids}))
    try:
        sq = run(
            ["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        view.unreachable = f"the SLURM controller did not answer squeue within {timeout_s:g} s"
        return view
    if sq.returncode == 0:
        for line in sq.stdout.splitlines():
            jid, state, reason = (line.split("|") + ["", ""])[:3]
            view.states[jid.strip()] = (state.strip(), "" if reason.strip() == "None" else reason.strip())
    elif "contact slurm controller" in sq.stderr or "Socket timed out" in sq.stderr:
        view.unreachable = f"squeue cannot reach the SLURM controller ({sq.stderr.strip().splitlines()[-1]})"
        return view
    if shutil.which("sacct"):
        try:
            cmd = ["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State,Reason"]
            sa = run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return view
        if sa.returncode == 0:
            for line in sa.stdout.splitlines():
                jid, state, reason = (line.split("|") + ["", ""])[:3]
                view.states.setdefault(jid.strip(), (state.split()[0] if state else "", "" if reason == "None" else reason))
    return view


def queued_jobs(paths: StudyPaths) -> dict[str, str]:
    """Job key -> SLURM id (``123`` or ``123_4``) of every job the study's latest submit queued."""
    out = {}
    for sub in latest_submission(paths) or []:
        if sub.get("id"):
            for index, key in sub["tasks"]:
                out[key] = f"{sub['id']}_{index}" if sub["array"] else str(sub["id"])
    return out


def cancel_study(paths: StudyPaths, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> list[str]:
    """scancel the jobs still queued or running of every submit of the study; return their ids."""
    ids = submitted_ids(paths, every=True)
    if not ids:
        raise OrchestratorError(f"study {paths.study!r} has no SLURM submission under {paths.root}")
    require_slurm()
    active = active_ids(ids, run)
    if active:
        result = run(["scancel", *active], capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmError(f"scancel failed: {result.stderr.strip()}")
    return active
