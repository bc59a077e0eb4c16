"""What a study queued on SLURM and what SLURM says of it: the submission records under
``studies/<study>/slurm/`` (every submit of a study, and its latest), the controller's limits,
one batched ``squeue`` + ``sacct`` query, and cancelling.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import ExecutorUnavailable, OrchestratorError
from orchestrator.fsutil import atomic_write_json, read_json
from orchestrator.paths import StudyPaths
from orchestrator.records import now

from .layout import Submission


class SlurmError(OrchestratorError):
    """A SLURM command failed; the message carries SLURM's own stderr."""


QUERY_TIMEOUT_S = 5.0  # squeue/sacct/scontrol for status: a controller slower than this counts as unreachable
# squeue/sacct states of a job that will still run (or is running)
SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
# A job that the scheduler ended without the runner recording an outcome (cancelled by a failed
# dependency, killed by the time limit or out of memory) never wrote its own final state.
SLURM_ENDED = {"CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


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

def cluster_limits(run: Callable[..., subprocess.CompletedProcess[str]], timeout_s: float) -> ClusterLimits:
    """The controller's limits; refuses to go on when the controller does not answer."""
    try:
        result = run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"the SLURM controller did not answer `scontrol show config` within {timeout_s:g} s "
            "(executor.slurm.sbatch_timeout_s); nothing was submitted. Check `sinfo`, then submit again"
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

def stamped_folder(parent: Path) -> Path:
    """A new folder ``parent/<UTC time to the second>-<8 hex digits>`` (``2025-01-31T120000Z-1a2b3c4d``):
    sorted by when it was made, and unique without a lock."""
    stamp = now().replace(":", "").replace("+0000", "Z")
    folder = parent / f"{stamp}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder

def save_submission(paths: StudyPaths, folder: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` (``SubmitRecord.as_json``'s format: ``submissions``, ``submitted_at``, and
    any further keys) to ``folder/submission.json`` and make it the study's latest submit."""
    atomic_write_json(folder / "submission.json", dict(record), compact=True)
    track_submission(paths, folder)

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

def missing_commands() -> str | None:
    """Why SLURM cannot be used from this machine (its commands are not on PATH), or None."""
    missing = [c for c in ("sbatch", "squeue", "scancel") if shutil.which(c) is None]
    if not missing:
        return None
    return (
        f"executor 'slurm' needs SLURM's commands, and {', '.join(missing)} is not on PATH on this machine; "
        "submit from a cluster login node, use --executor local, or --dry-run to only write the scripts"
    )


def require_slurm() -> None:
    problem = missing_commands()
    if problem:
        raise ExecutorUnavailable(problem)

def cancel_study(
    paths: StudyPaths, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
) -> list[str] | None:
    """scancel the jobs still queued or running of every submit of the study; return their ids
    (None: the study has no SLURM submission under this store)."""
    ids = submitted_ids(paths, every=True)
    if not ids:
        return None
    require_slurm()
    active = active_ids(ids, run)
    if active:
        result = run(["scancel", *active], capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmError(f"scancel failed: {result.stderr.strip()}")
    return active
