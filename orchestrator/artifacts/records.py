"""The store's records read defensively: a version's manifest (``version.json``), a job record
(``jobs/<key>.json``) and an alias file (``aliases.json``) are either returned complete and valid
or refused with ``DamagedRecord``, one line naming the file, what is wrong and what to do. Nothing
downstream indexes into unchecked JSON, and no manifest path can leave the folder it describes:
paths are relative, without empty, ``.`` or ``..`` components or NUL, and digests are 64 hex digits
(a blob's path is built from its digest)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import NAME_RE, ArtifactRef, DamagedRecord, FileEntry, JobCommit, Producer

SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")
# A safe relative path: components of anything but "/" and NUL, none of them "." or ".." (the
# common case, checked in one match; ``unsafe_path`` says what is wrong with the others)
_SAFE_PATH_RE = re.compile(r"(?:(?!\.\.?/)[^/\x00]+/)*(?!\.\.?$)[^/\x00]+")
VERSION_CONSEQUENCE = "jobs that made or used that version then run again"
JOB_CONSEQUENCE = "the job then runs again"
ALIAS_CONSEQUENCE = "its aliases are dropped; vN and latest still work, and the next log writes them anew"
_PRODUCER_TEXT = ("job_key", "study", "stage", "job_label")


@dataclass(frozen=True)
class VersionRecord:
    """A valid ``version.json``."""

    type: str
    digest: str
    files: tuple[FileEntry, ...]
    metadata: dict[str, Any]
    created_at: str
    producer: Producer | None


def manifest_digest(files: Sequence[FileEntry]) -> str:
    """sha256 over the canonical sorted manifest (path, sha256, size); metadata is not part of it."""
    rows = sorted([f.path, f.sha256, f.size] for f in files)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def unsafe_path(path: object) -> str | None:
    """Why ``path`` may not name a file of a version (it could leave the version's folder), or None."""
    if not isinstance(path, str):
        return "is not a string"
    if not path:
        return "is empty"
    if "\x00" in path:
        return "contains a NUL character"
    if path.startswith("/"):
        return "is absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' component"
    return None


def read_json(path: Path, consequence: str) -> Any:
    """The JSON in ``path``; FileNotFoundError if it is missing, DamagedRecord if unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DamagedRecord(path, f"it cannot be read ({e.strerror})", consequence) from e
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        what = "it is empty" if not data.strip() else f"it is not valid JSON ({' '.join(str(e).split())})"
        raise DamagedRecord(path, what, consequence) from e


# ------------------------------------------------------------------------------- version.json
def parse_version(path: Path, value: Any) -> VersionRecord:
    """``value`` (the JSON of ``path``) as a VersionRecord, or DamagedRecord saying what is wrong."""
    problem = _version_problem(value)
    if problem is not None:
        raise DamagedRecord(path, problem, VERSION_CONSEQUENCE)
    files = tuple(_file_entry(f) for f in value["files"])
    layout = _layout_problem([f.path for f in files])
    if layout is not None:
        raise DamagedRecord(path, layout, VERSION_CONSEQUENCE)
    try:
        producer = _producer(value["producer"])
    except ValueError as e:
        raise DamagedRecord(path, f"its producer is invalid ({e})", VERSION_CONSEQUENCE) from e
    return VersionRecord(value["type"], value["digest"], files, value["metadata"], value["created_at"], producer)


def _version_problem(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "it is not a JSON object"
    for key, kind in (("type", str), ("digest", str), ("files", list), ("metadata", dict), ("created_at", str)):
        if not isinstance(value.get(key), kind):
            return f"its {key!r} is missing or not a {kind.__name__}"
    if "producer" not in value:
        return "its 'producer' is missing"
    if not SHA_RE.match(value["digest"]):
        return f"its digest {value['digest']!r} is not 64 hex digits"
    if not value["files"]:
        return "it lists no files"
    return next((p for p in map(_file_problem, value["files"]) if p is not None), None)


def _file_problem(entry: Any) -> str | None:
    if (
        type(entry) is dict
        and isinstance(path := entry.get("path"), str)
        and _SAFE_PATH_RE.fullmatch(path)
        and isinstance(sha := entry.get("sha256"), str)
        and SHA_RE.match(sha)
        and type(size := entry.get("size")) is int
        and size >= 0
    ):
        return None  # the common case, in one pass: 2,000 entries per record are not rare
    if not isinstance(entry, dict):
        return f"a file entry is not an object: {entry!r:.80}"
    path, sha, size = entry.get("path"), entry.get("sha256"), entry.get("size")
    if (reason := unsafe_path(path)) is not None:
        return f"file path {path!r:.200} {reason}: a manifest path must stay inside the version's folder"
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        return f"file {path!r} has digest {sha!r:.80}, not 64 hex digits"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"file {path!r} has size {size!r:.40}, not a whole number of bytes"
    return None


def _file_entry(entry: dict[str, Any]) -> FileEntry:
    return FileEntry(entry["path"], entry["sha256"], entry["size"])


def _layout_problem(paths: list[str]) -> str | None:
    """Two entries for one path, or a file where another entry needs a folder."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            return f"it lists file path {path!r} twice"
        seen.add(path)
    for path in paths:
        parts = path.split("/")
        for k in range(1, len(parts)):
            if (parent := "/".join(parts[:k])) in seen:
                return f"file path {path!r} is inside {parent!r}, which is a file"
    return None


def _producer(value: Any) -> Producer | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("not an object")
    texts = {key: value.get(key) for key in _PRODUCER_TEXT}
    bad = [key for key, text in texts.items() if not isinstance(text, str)]
    if bad:
        raise ValueError(f"{', '.join(bad)} missing or not text")
    inputs, provenance = value.get("inputs", []), value.get("provenance", {})
    if not isinstance(inputs, list) or not isinstance(provenance, dict):
        raise ValueError("inputs must be a list, provenance an object")
    job_key, study, stage, job_label = (str(texts[key]) for key in _PRODUCER_TEXT)
    return Producer(job_key, study, stage, job_label, inputs=tuple(_ref(r) for r in inputs), provenance=provenance)


def _ref(text: Any) -> ArtifactRef:
    """A ``name:vN`` reference from a record, or ValueError."""
    m = re.fullmatch(r"(?P<name>[^:]+):v(?P<n>\d+)", text) if isinstance(text, str) else None
    if m is None or not NAME_RE.match(m["name"]) or len(m["name"]) > 128:
        raise ValueError(f"{text!r:.80} is not a version reference NAME:vN")
    return ArtifactRef(m["name"], int(m["n"]))


# -------------------------------------------------------------------------- jobs/<key>.json
def parse_job(path: Path, value: Any, job_key: str) -> JobCommit:
    """``value`` (the JSON of job record ``path``) as a JobCommit, or DamagedRecord."""
    try:
        return _job_commit(value, job_key)
    except ValueError as e:
        raise DamagedRecord(path, str(e), JOB_CONSEQUENCE) from e


def _job_commit(value: Any, job_key: str) -> JobCommit:
    if not isinstance(value, dict):
        raise ValueError("it is not a JSON object")
    if value.get("job_key", job_key) != job_key:
        raise ValueError(f"it records job {value['job_key']!r:.80}, not {job_key!r}")
    outputs = value.get("outputs")
    if not isinstance(outputs, dict):
        raise ValueError("its 'outputs' is missing or not an object")
    inputs = value.get("inputs")
    if inputs is not None and not (isinstance(inputs, dict) and all(isinstance(v, list) for v in inputs.values())):
        raise ValueError("its 'inputs' is not an object of lists")
    try:
        out = {str(name): _ref(text) for name, text in outputs.items()}
        ins = None if inputs is None else {str(name): tuple(_ref(t) for t in refs) for name, refs in inputs.items()}
    except ValueError as e:
        raise ValueError(f"it names a version wrongly: {e}") from e
    return JobCommit(outputs=out, inputs=ins)


# ----------------------------------------------------------------------------- aliases.json
def parse_aliases(path: Path, value: Any) -> dict[str, int]:
    """``value`` (the JSON of alias file ``path``) as {alias: version number}, or DamagedRecord."""
    if not isinstance(value, dict):
        raise DamagedRecord(path, "it is not a JSON object", ALIAS_CONSEQUENCE)
    for alias, number in value.items():
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise DamagedRecord(path, f"alias {alias!r:.80} names {number!r:.40}, not a version number", ALIAS_CONSEQUENCE)
    return value
