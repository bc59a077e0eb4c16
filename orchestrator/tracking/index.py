"""The study index: what ``track`` publishes to W&B so that ``pull`` can rebuild a local store.

One W&B artifact per study, ``wandb_artifact_name(f"{study}.orchestrator-index")`` of type
``orchestrator-index`` (aliases ``latest`` and ``study-<study>``), logged by ``track`` in a run of
its own (id ``run_id(study, "orchestrator-index")``, group = study, job type
``orchestrator-index``). It holds one file, ``index.json``::

    {"format": 1, "study": "demo", "created_at": "...",
     "plan": {... studies/<study>/plan.json, exactly ...},
     "jobs": [{"key": ..., "label": ..., "run_id": ...,
               "record": {... the store's jobs/<key>.json, exactly ...}}],
     "versions": [{"ref": "demo.prune.language=en:v0",
                   "record": {... artifacts/<name>/versions/vN/version.json, exactly ...},
                   "wandb": {"name": "<W&B artifact name>", "alias": "job-<key16>"}}]}

- ``jobs``: every job of the plan with a committed job record in the store, in plan order.
- ``versions``: every version those records name (outputs and inputs), each once, in lineage
  order (a version's inputs before it). ``wandb.alias`` names the version in W&B: ``job-<key16>``
  of the first indexed job that committed it as an output (``track`` logs it with that alias),
  else of its producer (an input made outside the plan: logged by whoever ran that job).

The format is defined here once: ``build_index`` writes it, ``parse_index`` reads it back and
refuses a malformed index with ``BadIndex`` (one line saying where and what). It does not check
files: ``pull`` verifies each downloaded file against ``IndexedVersion.files`` and the digest.
See /work/notes/wandb_index.md for the contract between the two sides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactError, ArtifactRef, DamagedRecord, FileEntry, JobCommit, check_name
from orchestrator.artifacts.reading import StoreReader
from orchestrator.artifacts.records import (
    JOB_CONSEQUENCE,
    VERSION_CONSEQUENCE,
    manifest_digest,
    parse_job,
    parse_version,
    read_json,
)
from orchestrator.errors import OrchestratorError
from orchestrator.paths import StudyPaths
from orchestrator.records import now, read_plan
from orchestrator.tracking.wandb_files import MARKER, WANDB_NAME, run_id, wandb_artifact_name

FORMAT = 1
INDEX_KEY = "orchestrator-index"  # the index run's "job key": its run id, job type and folder name
INDEX_TYPE = "orchestrator-index"  # the W&B artifact type
INDEX_FILE = "index.json"
_ALIAS_RE = re.compile(r"^[^/:]{1,128}\Z")


class BadIndex(OrchestratorError):
    """An index that is not in the format ``build_index`` writes; the message says where."""


def index_artifact_name(study: str) -> str:
    """The study index's W&B artifact name."""
    return wandb_artifact_name(f"{study}.{INDEX_KEY}")


def index_aliases(study: str) -> list[str]:
    return ["latest", f"study-{study}"]


def index_dir(paths: StudyPaths) -> Path:
    """Where the index run's files and its ``wandb-run.json`` live (``jobs/orchestrator-index/``,
    next to the jobs' folders, so that ``sync`` can treat the index run as a job after all others)."""
    return paths.job(INDEX_KEY).dir


def with_index_job(paths: StudyPaths, plan_jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``plan_jobs`` (plan.json's entries) and, once ``track`` has made the index run, the index run
    as one more entry depending on every job: what ``sync`` reads to upload it last, after every
    run whose artifacts it lists."""
    if not (index_dir(paths) / MARKER).exists():
        return list(plan_jobs)
    return [*plan_jobs, {"key": INDEX_KEY, "label": INDEX_KEY, "deps": [str(j["key"]) for j in plan_jobs]}]


# --------------------------------------------------------------------------------------- parsed
@dataclass(frozen=True)
class IndexedVersion:
    """One artifact version of the index: its store record and where it is in W&B."""

    ref: ArtifactRef
    type: str
    digest: str
    files: tuple[FileEntry, ...]
    record: Mapping[str, Any]  # version.json as the producing store holds it
    wandb_name: str
    wandb_alias: str

    @property
    def wandb_ref(self) -> str:
        """``<W&B artifact name>:<alias>``: what to ask W&B for."""
        return f"{self.wandb_name}:{self.wandb_alias}"


@dataclass(frozen=True)
class IndexedJob:
    """One committed job of the index."""

    key: str
    label: str
    run_id: str
    outputs: Mapping[str, ArtifactRef]
    inputs: Mapping[str, tuple[ArtifactRef, ...]] | None
    record: Mapping[str, Any]  # jobs/<key>.json as the producing store holds it


@dataclass(frozen=True)
class Index:
    """A parsed, consistent study index (``parse_index``)."""

    format: int
    study: str
    created_at: str
    plan: Mapping[str, Any]
    jobs: tuple[IndexedJob, ...]
    versions: tuple[IndexedVersion, ...]  # lineage order: a version's inputs before it

    def version(self, ref: ArtifactRef | str) -> IndexedVersion:
        """The indexed version ``ref`` (``name:vN``); BadIndex if the index does not list it."""
        ref = ArtifactRef.parse(ref) if isinstance(ref, str) else ref
        for v in self.versions:
            if v.ref == ref:
                return v
        raise BadIndex(f"the index of study {self.study!r} lists no version {ref}")


# ---------------------------------------------------------------------------------------- build
def build_index(paths: StudyPaths, store: StoreReader, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The study's index (JSON data) from its plan.json and the store's records, read as they are
    on disk. ``keys``: the committed jobs to list (default: every job of the plan whose record is
    committed, ``store.job_problem`` None); DamagedRecord if a record cannot be read."""
    plan = read_plan(paths)
    wanted = None if keys is None else set(keys)
    jobs: list[dict[str, Any]] = []
    commits: list[tuple[str, JobCommit]] = []
    for entry in plan["jobs"]:
        key = str(entry["key"])
        if (wanted is not None and key not in wanted) or (wanted is None and store.job_problem(key) is not None):
            continue
        record = _raw_job(store, key)
        commits.append((key, parse_job(store._job_path(key), record, key)))
        jobs.append({"key": key, "label": entry["label"], "run_id": run_id(paths.study, key), "record": record})
    return {
        "format": FORMAT,
        "study": paths.study,
        "created_at": now(),
        "plan": plan,
        "jobs": jobs,
        "versions": _versions(store, commits),
    }


def _raw_job(store: StoreReader, key: str) -> dict[str, Any]:
    path = store._job_path(key)  # the store's own layout, named once in reading.py
    value = read_json(path, JOB_CONSEQUENCE)
    parse_job(path, value, key)  # valid, or DamagedRecord
    return dict(value)


def _raw_version(store: StoreReader, ref: ArtifactRef) -> dict[str, Any]:
    path = store._record_path(ref.name, ref.version)
    try:
        value = read_json(path, VERSION_CONSEQUENCE)
    except FileNotFoundError as e:
        raise DamagedRecord(path, "it is missing from its version folder", VERSION_CONSEQUENCE) from e
    parse_version(path, value)
    return dict(value)


def _versions(store: StoreReader, commits: list[tuple[str, JobCommit]]) -> list[dict[str, Any]]:
    """Every version the commits name, inputs before outputs, each once, with its W&B alias."""
    made_by: dict[ArtifactRef, str] = {}
    for key, commit in commits:
        for ref in commit.outputs.values():
            made_by.setdefault(ref, key)
    order: dict[ArtifactRef, None] = {}
    for _, commit in commits:
        for refs in (commit.inputs or {}).values():
            order.update(dict.fromkeys(refs))
        order.update(dict.fromkeys(commit.outputs[name] for name in sorted(commit.outputs)))
    out = []
    for ref in order:
        record = _raw_version(store, ref)
        producer = made_by.get(ref) or ((record.get("producer") or {}).get("job_key"))
        out.append(
            {
                "ref": str(ref),
                "record": record,
                "wandb": {"name": wandb_artifact_name(ref.name), "alias": f"job-{producer[:16]}" if producer else "latest"},
            }
        )
    return out


# ---------------------------------------------------------------------------------------- parse
def parse_index(data: Any) -> Index:
    """``data`` (the JSON of ``index.json``) as an Index, or BadIndex naming what is wrong: an
    unknown format, a missing or mistyped field, an invalid job or version record, a version
    whose digest does not match its file list, or a job naming a version the index lacks."""
    if not isinstance(data, dict):
        raise BadIndex("the study index is not a JSON object")
    if data.get("format") != FORMAT:
        raise BadIndex(f"the study index has format {data.get('format')!r:.40}; this version reads format {FORMAT}")
    study, created_at, plan = _field(data, "study", str), _field(data, "created_at", str), _field(data, "plan", dict)
    if not isinstance(plan.get("jobs"), list) or plan.get("study") != study:
        raise BadIndex(f"the study index's plan is not the plan of study {study!r}")
    versions = tuple(_parse_version(v, i) for i, v in enumerate(_field(data, "versions", list)))
    known = {v.ref for v in versions}
    if len(known) != len(versions):
        raise BadIndex("the study index lists a version twice")
    jobs = tuple(_parse_job(j, i, study) for i, j in enumerate(_field(data, "jobs", list)))
    planned = {str(j.get("key")) for j in plan["jobs"] if isinstance(j, dict)}
    for job in jobs:
        if job.key not in planned:
            raise BadIndex(f"the study index lists job {job.key!r:.80}, which its plan does not have")
        named = [*job.outputs.values(), *(r for refs in (job.inputs or {}).values() for r in refs)]
        missing = [str(r) for r in named if r not in known]
        if missing:
            raise BadIndex(f"job {job.label!r} of the study index names versions it does not list: {', '.join(missing)}")
    return Index(FORMAT, study, created_at, plan, jobs, versions)


def read_index(path: Path) -> Index:
    """``parse_index`` of a downloaded ``index.json``; BadIndex if it is not JSON."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadIndex(f"{path} is not a study index: not valid JSON ({e})") from None
    return parse_index(data)


def _field(data: Mapping[str, Any], name: str, kind: type, where: str = "the study index") -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadIndex(f"{where}: {name!r} is missing or not a {kind.__name__}")
    return value


def _parse_version(value: Any, i: int) -> IndexedVersion:
    where = f"the study index's versions[{i}]"
    if not isinstance(value, dict):
        raise BadIndex(f"{where} is not an object")
    text, record = _field(value, "ref", str, where), _field(value, "record", dict, where)
    wandb = _field(value, "wandb", dict, where)
    try:
        parsed = parse_version(Path(f"{where}.record"), record)
        ref = ArtifactRef.parse(text)
        check_name(ref.name)
    except DamagedRecord as e:
        raise BadIndex(f"{where} ({text:.140}): its record is invalid: {e.problem}") from None
    except ArtifactError as e:  # not NAME:vN
        raise BadIndex(f"{where}: {e}") from None
    if manifest_digest(parsed.files) != parsed.digest:
        raise BadIndex(f"{where} ({text}): its digest does not match its file list")
    name, alias = _field(wandb, "name", str, f"{where}.wandb"), _field(wandb, "alias", str, f"{where}.wandb")
    if not WANDB_NAME.match(name) or not _ALIAS_RE.match(alias):
        raise BadIndex(f"{where}.wandb: {name!r:.140}:{alias!r:.140} is not a W&B artifact name and alias")
    return IndexedVersion(ref, parsed.type, parsed.digest, parsed.files, record, name, alias)


def _parse_job(value: Any, i: int, study: str) -> IndexedJob:
    where = f"the study index's jobs[{i}]"
    if not isinstance(value, dict):
        raise BadIndex(f"{where} is not an object")
    key, label, rid = (_field(value, f, str, where) for f in ("key", "label", "run_id"))
    record = _field(value, "record", dict, where)
    if rid != run_id(study, key):
        raise BadIndex(f"{where} ({label}): run id {rid!r:.40} is not the job's run id in study {study!r}")
    try:
        commit = parse_job(Path(f"{where}.record"), record, key)
    except DamagedRecord as e:
        raise BadIndex(f"{where} ({label}): its record is invalid: {e.problem}") from None
    if record.get("job_key") != key:
        raise BadIndex(f"{where} ({label}): its record is not job {key!r:.80}'s")
    return IndexedJob(key, label, rid, dict(commit.outputs), commit.inputs, record)
