"""``python -m orchestrator pull ENTITY/PROJECT STUDY``: rebuild a study's store from W&B.

On a machine that never had the cluster's store, ``pull`` reads the study index that ``track``
published (``tracking/index.py``) and downloads every version it lists from W&B into a local
store, so that ``plots`` and ``artifacts`` work there and a ``submit`` of the same spec finds every
indexed job cached. In order:

1. Download the index (``<study>.orchestrator-index:latest``) and parse it (``parse_index``).
2. Check the local store before writing anything: a version already there with the same digest is
   skipped (a pull resumes where it stopped); the same number with another digest, a job record
   with other outputs, or a plan of another spec is a one-line error and nothing is written.
3. Download each missing version (``<W&B name>:<alias>`` from the index) into a folder in the
   store's ``tmp/`` and verify every file's size and sha256 against the index's record of the
   version, and the record's digest (``manifest_digest``), before anything enters the store. A
   mismatch stops the pull: nothing of it is committed.
4. Commit the versions in lineage order under their own numbers and records (``artifacts.adopt``,
   crash-safe like ``log``: files are moved, not copied), then the job records exactly as indexed,
   then ``plan.json``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import console
from orchestrator.artifacts import ArtifactNotFound, LocalStore
from orchestrator.artifacts.adopt import adopt, adopt_job, job_conflict, present
from orchestrator.errors import BadArgument
from orchestrator.fsutil import atomic_write_json, read_json
from orchestrator.paths import StudyPaths, storage_root_problem
from orchestrator.tracking.index import Index, IndexedVersion, read_index
from orchestrator.tracking.pull_source import PullError, WandbProject

CHUNK = 1 << 20


@dataclass
class PullReport:
    """What ``pull`` did (or, with ``dry_run``, would do)."""

    pulled: list[str] = field(default_factory=list)  # versions downloaded (and committed unless dry run)
    present: list[str] = field(default_factory=list)  # versions the store had already
    jobs: list[str] = field(default_factory=list)  # job records written
    jobs_present: list[str] = field(default_factory=list)
    plan: str = ""  # what happened to plan.json


def parse_target(text: str) -> tuple[str, str]:
    """``ENTITY/PROJECT`` as (entity, project); BadArgument otherwise."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise BadArgument(
            f"W&B project {text!r} is not ENTITY/PROJECT (e.g. my-team/cross-lingual-subnets, as in the project's W&B URL)"
        )
    return parts[0].strip(), parts[1].strip()


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_download(version: IndexedVersion, folder: Path, where: str, study: str) -> None:
    """Every file under ``folder`` is one the index lists for ``version``, with its size and sha256,
    and none is missing; PullError naming the first difference otherwise."""
    expected = {f.path: f for f in version.files}
    got = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    advice = (
        "nothing was written to the store; the W&B artifact is not what the study committed"
        f" (run `orchestrator track {study} --force` where its store is, then pull again)"
    )
    for rel in sorted(got):
        want = expected.get(rel)
        if want is None:
            raise PullError(f"{where} holds file {rel!r}, which {version.ref} does not have; {advice}")
        path = got[rel]
        size = path.stat().st_size if path.is_file() else -1
        if size != want.size or _sha256(path) != want.sha256:
            raise PullError(
                f"{where}: file {rel!r} does not match {version.ref}'s record (sha256/size differ from the index); {advice}"
            )
    missing = sorted(set(expected) - set(got))
    if missing:
        raise PullError(f"{where} lacks {len(missing)} file(s) of {version.ref} ({', '.join(missing[:3])}); {advice}")


def _job_keys(plan: object) -> set[str] | None:
    jobs = plan.get("jobs") if isinstance(plan, dict) else None
    return {str(j.get("key")) for j in jobs if isinstance(j, dict)} if isinstance(jobs, list) else None


class Puller:
    """One pull of ``study`` from ``source`` into the storage root ``root``."""

    def __init__(self, source: WandbProject, study: str, root: Path, echo: Callable[[str], None]) -> None:
        self.source, self.study, self.echo = source, study, echo
        self.paths = StudyPaths(root, study)
        self.report = PullReport()

    def index(self, work: Path) -> Index:
        folder = work / "index"
        folder.mkdir()
        index = read_index(self.source.index_file(self.study, folder))
        if index.study != self.study:
            raise PullError(f"the index in {self.source.path} is study {index.study!r}, not {self.study!r}")
        return index

    def plan_action(self, index: Index) -> str:
        """What to do with plan.json: "write", "same", or "keep" (a plan of the same jobs is there,
        e.g. written by a ``submit`` of the same spec with another storage root)."""
        if not self.paths.plan.exists():
            return "write"
        mine = read_json(self.paths.plan)
        if mine == index.plan:
            return "same"
        if _job_keys(mine) == _job_keys(index.plan):
            return "keep"
        raise PullError(
            f"{self.paths.plan} plans other jobs for study {self.study!r} than W&B's index; nothing was written"
            " (pull into another --store)"
        )

    def todo(self, store: LocalStore | None, index: Index) -> list[IndexedVersion]:
        """The versions to download: not in ``store``, or in it with a blob missing (then the pull
        restores it). AdoptConflict (nothing written) if a number holds other content."""
        wanted = []
        for v in index.versions:
            if store is not None and present(store, v.ref, v.digest) and self._blobs_in_place(store, v):
                self.report.present.append(str(v.ref))
                continue
            wanted.append(v)
        for job in index.jobs:
            if store is not None and job_conflict(store, job.key, job.record) == "same":
                self.report.jobs_present.append(job.key)
        return wanted

    @staticmethod
    def _blobs_in_place(store: LocalStore, v: IndexedVersion) -> bool:
        return all(store._blob(f.sha256).is_file() for f in v.files)

    def fetch(self, v: IndexedVersion, folder: Path) -> None:
        """Download ``v`` into ``folder`` and verify it; one line of progress."""
        art = self.source.artifact(v.wandb_name, v.wandb_alias, study=self.study)
        where = f"W&B artifact {self.source.path}/{v.wandb_ref}"
        theirs = ((getattr(art, "metadata", None) or {}).get("orchestrator") or {}).get("digest")
        if theirs and theirs != v.digest:
            raise PullError(
                f"{where} has digest {str(theirs)[:12]} in its metadata, the index says {v.ref} has {v.digest[:12]};"
                f" nothing was written to the store (run `orchestrator track {self.study} --force` where its store is)"
            )
        folder.mkdir()
        self.source.download(art, folder)
        verify_download(v, folder, where, self.study)
        self.report.pulled.append(str(v.ref))
        self.echo(f"  {v.ref}  {len(v.files)} files, {_size(sum(f.size for f in v.files))}, verified  ({v.wandb_ref})")

    def commit(self, store: LocalStore, index: Index, fetched: list[tuple[IndexedVersion, Path]], plan_action: str) -> None:
        for v, folder in fetched:
            adopt(store, v.ref, v.record, folder, move=True)
        for job in index.jobs:
            if adopt_job(store, job.key, job.record):
                self.report.jobs.append(job.key)
        if plan_action == "write":
            atomic_write_json(self.paths.plan, dict(index.plan))
        self.report.plan = {"write": "written", "same": "present", "keep": "kept (one of the same jobs was there)"}[plan_action]


def pull_study(
    target: str, study: str, root: Path, *, dry_run: bool = False, echo: Callable[[str], None] = print,
    source: WandbProject | None = None,
) -> PullReport:
    """Pull ``study`` from the W&B project ``target`` (``ENTITY/PROJECT``) into the storage root ``root``.
    ``source``: read from it instead (its owner closes it); by default the W&B project, closed here."""
    entity, project = parse_target(target)
    if (problem := storage_root_problem(root)) is not None:
        raise BadArgument(f"--store {root}: {problem}")
    owned = source is None
    source = source or WandbProject(entity, project, Path.cwd(), root)
    puller = Puller(source, study, root.resolve(), echo)
    store = _open(puller.paths.store, dry_run)
    work = _workdir(None if dry_run else store)
    try:
        index = puller.index(work)
        plan_action = puller.plan_action(index)
        todo = puller.todo(store, index)
        echo(
            f"study {study!r} from W&B {source.path}: {len(index.versions)} versions, {len(index.jobs)} jobs;"
            f" {len(puller.report.present)} versions already in {puller.paths.store}"
        )
        if dry_run or store is None:
            for v in todo:
                echo(f"  would pull {v.ref}  {len(v.files)} files, {_size(sum(f.size for f in v.files))}  ({v.wandb_ref})")
            puller.report.pulled = [str(v.ref) for v in todo]
            return puller.report
        fetched = []
        for k, v in enumerate(todo):
            puller.fetch(v, work / f"v{k}")
            fetched.append((v, work / f"v{k}"))
        puller.commit(store, index, fetched, plan_action)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if owned:
            source.close()
    return puller.report


def pull_command(target: str, study: str, root: Path, *, dry_run: bool) -> int:
    """The ``pull`` command: progress (one line per artifact, none under ``-q``), then a summary."""

    def progress(line: str) -> None:
        if not console.quiet():
            print(line, flush=True)

    report = pull_study(target, study, root, dry_run=dry_run, echo=progress)
    if dry_run:
        print(f"would pull {len(report.pulled)} versions ({len(report.present)} present); nothing written")
        return 0
    print(
        f"pulled {len(report.pulled)} versions ({len(report.present)} were present), {len(report.jobs)} job records"
        f" ({len(report.jobs_present)} present), plan.json {report.plan}, into {root};"
        f" next: python -m orchestrator plots {study} --store {root}"
    )
    return 0


def _open(root: Path, dry_run: bool) -> LocalStore | None:
    """The local store (created unless ``dry_run``); None for a dry run where there is none yet."""
    try:
        return LocalStore(root, create=not dry_run)
    except ArtifactNotFound:
        return None


def _workdir(store: LocalStore | None) -> Path:
    """An empty folder for downloads: in the store's ``tmp/`` (the same filesystem, so committing
    moves files; ``fsck`` removes it if the pull is killed), else a temporary folder."""
    if store is None:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="orchestrator-pull-"))
    work = Path(store._blobs.tmp_path("pull"))
    work.mkdir()
    return work
