"""The reading side of the local store: where versions and job records live, and reading them
(resolving references and aliases, parsing records, checking that a job's outputs are intact).
``LocalStore`` adds the writing side, whose commit order its module docstring argues; nothing
here writes to the store.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .base import (
    NAME_RE,
    REF_RE,
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    ArtifactVersion,
    DamagedRecord,
    JobCommit,
    check_name,
)
from .ingest import BlobWriter
from .records import (
    ALIAS_CONSEQUENCE,
    JOB_CONSEQUENCE,
    VERSION_CONSEQUENCE,
    VersionRecord,
    manifest_digest,
    parse_aliases,
    parse_job,
    parse_version,
    read_json,
)

LATEST = "latest"
NOT_RUN = "not run yet"
VERSION_DIR_RE = re.compile(r"^v(\d+)\Z")
JOB_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}\Z")
_RECORDS_KEPT = 64  # parsed version records kept per store (a record of 2,000 files is ~0.5 MB parsed)


def _describe(items: Sequence[str], limit: int = 12) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class StoreReader(ArtifactStore):
    """Reads a local store under ``root`` (see ``LocalStore``, which sets up the attributes)."""

    root: Path
    _blobs: BlobWriter
    _records: dict[Path, tuple[tuple[int, ...], VersionRecord]]  # see _read_record

    def _blob(self, sha: str) -> Path:
        return Path(self._blobs.blob_path(sha))

    def _art_dir(self, name: str) -> Path:
        return self.root / "artifacts" / check_name(name)

    def _record_path(self, name: str, number: int) -> Path:
        return self._art_dir(name) / "versions" / f"v{number}" / "version.json"

    def _version_numbers(self, name: str) -> list[int]:
        vdir = self._art_dir(name) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(int(m[1]) for e in os.listdir(vdir) if (m := VERSION_DIR_RE.match(e)))

    def _type_of(self, name: str, number: int) -> str | None:
        try:
            return self._read_record(name, number).type
        except DamagedRecord:
            return None

    def _aliases(self, name: str) -> dict[str, int]:
        path = self._art_dir(name) / "aliases.json"
        try:
            value = read_json(path, ALIAS_CONSEQUENCE)
        except FileNotFoundError:
            return {}
        return parse_aliases(path, value)

    def _read_record(self, name: str, number: int) -> VersionRecord:
        """Version ``number``'s record, valid (``records.VersionRecord``), or DamagedRecord. Parsed
        records are kept while their file's stamp is unchanged (a re-log reads one twice; the
        runner gets each input several times): any rewrite moves the stamp, so nothing stale is
        served. The caller must not change the record's dicts (``_to_version`` copies them)."""
        path = self._record_path(name, number)
        try:
            st = os.stat(path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if (kept := self._records.get(path)) is not None and kept[0] == stamp:
                return kept[1]
            value = read_json(path, VERSION_CONSEQUENCE)
        except FileNotFoundError as e:
            raise DamagedRecord(path, "it is missing from its version folder", VERSION_CONSEQUENCE) from e
        record = parse_version(path, value)
        if len(self._records) >= _RECORDS_KEPT:
            self._records.clear()
        self._records[path] = (stamp, record)
        return record

    def _to_version(self, name: str, number: int, aliases: Mapping[str, int], latest: int | None) -> ArtifactVersion:
        rec = self._read_record(name, number)
        names = sorted(a for a, n in aliases.items() if n == number)
        producer = rec.producer
        if producer is not None:  # its own provenance, as a freshly read record would have
            producer = dataclasses.replace(producer, provenance=copy.deepcopy(dict(producer.provenance)))
        return ArtifactVersion(
            ref=ArtifactRef(name, number),
            type=rec.type,
            digest=rec.digest,
            files=rec.files,  # a tuple of frozen entries: shared safely
            metadata=copy.deepcopy(rec.metadata),  # the caller's own, as a freshly read record's
            aliases=tuple(([LATEST] if number == latest else []) + names),
            created_at=rec.created_at,
            producer=producer,
        )

    def _resolve(self, ref: ArtifactRef | str) -> ArtifactRef:
        if isinstance(ref, ArtifactRef):
            name, alias = ref.name, f"v{ref.version}"
        else:
            m = REF_RE.match(ref)
            if not m:
                raise ArtifactError(f"not an artifact reference: {ref!r} (expected NAME:vN or NAME:ALIAS)")
            name, alias = m["name"], m["alias"]
        numbers = self._version_numbers(name)
        if not numbers:
            raise ArtifactNotFound(f"no artifact named {name!r} in {self.root}; artifacts: {_describe(self.names())}")
        versions = [f"v{n}" for n in numbers]
        if (m := VERSION_DIR_RE.match(alias)) and int(m[1]) in numbers:
            return ArtifactRef(name, int(m[1]))
        if alias == LATEST:
            return ArtifactRef(name, numbers[-1])
        aliases = self._aliases(name)
        if alias in aliases and aliases[alias] in numbers:
            return ArtifactRef(name, aliases[alias])
        if alias in aliases:
            raise ArtifactNotFound(
                f"alias {alias!r} of artifact {name!r} names v{aliases[alias]}, which no longer exists;"
                f" versions: {_describe(versions)}"
            )
        raise ArtifactNotFound(
            f"artifact {name!r} has no version or alias {alias!r}; versions: {_describe(versions)};"
            f" aliases: {_describe([LATEST, *sorted(aliases)])}"
        )

    def get(self, ref: ArtifactRef | str) -> ArtifactVersion:
        """A version by ``ArtifactRef`` or by ``name:vN`` / ``name:latest`` / ``name:alias`` text."""
        resolved = self._resolve(ref)
        latest = self._version_numbers(resolved.name)[-1]
        return self._to_version(resolved.name, resolved.version, self._aliases(resolved.name), latest)

    def _content(self, ref: ArtifactRef | str) -> ArtifactVersion:
        """A version's content and lineage without its aliases (what reading its files needs: a
        damaged alias file does not stop anyone from reading ``name:vN``)."""
        resolved = self._resolve(ref)
        return self._to_version(resolved.name, resolved.version, {}, None)

    def versions(self, name: str) -> list[ArtifactVersion]:
        """Every committed version of ``name``, oldest first (empty if there is none)."""
        numbers = self._version_numbers(name)
        aliases = self._aliases(name) if numbers else {}
        return [self._to_version(name, n, aliases, numbers[-1]) for n in numbers]

    def names(self) -> list[str]:
        """Every artifact name with at least one committed version, sorted."""
        entries = os.listdir(self.root / "artifacts")
        return sorted(n for n in entries if NAME_RE.match(n) and len(n) <= 128 and self._version_numbers(n))

    def _check_digest(self, version: ArtifactVersion) -> None:
        if manifest_digest(version.files) != version.digest:
            path = self._record_path(version.ref.name, version.ref.version)
            raise DamagedRecord(path, "its digest does not match its file list", VERSION_CONSEQUENCE)

    def _job_path(self, job_key: str) -> Path:
        if not JOB_KEY_RE.match(job_key):
            raise ArtifactError(
                f"invalid job key {job_key!r}: use up to 128 letters, digits and . _ - (starting with a letter or digit)"
            )
        return self.root / "jobs" / f"{job_key}.json"

    def job_record(self, job_key: str) -> JobCommit | None:
        """What ``job_key`` committed, or None if it never completed; DamagedRecord if unreadable."""
        path = self._job_path(job_key)
        try:
            value = read_json(path, JOB_CONSEQUENCE)
        except FileNotFoundError:
            return None
        return parse_job(path, value, job_key)

    def job_outputs(self, job_key: str) -> dict[str, ArtifactRef] | None:
        """The outputs recorded for ``job_key``, or None if the job never completed. (Whether they
        are all still in place: ``job_problem``.)"""
        commit = self.job_record(job_key)
        return None if commit is None else dict(commit.outputs)

    def job_problem(self, job_key: str) -> str | None:
        """None if ``job_key``'s record exists, is readable and every output version it names
        exists with all its blobs present; else why the job does not count as committed."""
        try:
            commit = self.job_record(job_key)
        except DamagedRecord as e:
            return str(e)
        if commit is None:
            return NOT_RUN
        return self.outputs_problem(commit.outputs)

    def outputs_problem(self, outputs: Mapping[str, ArtifactRef]) -> str | None:
        """See ``ArtifactStore.outputs_problem``."""
        for output, ref in sorted(outputs.items()):
            problem = self._output_problem(ref)
            if problem is not None:
                return f"output {output!r} ({ref}) {problem}"
        return None

    def _output_problem(self, ref: ArtifactRef) -> str | None:
        if ref.version not in self._version_numbers(ref.name):
            return "no longer exists"
        try:
            record = self._read_record(ref.name, ref.version)
        except DamagedRecord as e:
            return f"cannot be read: {e}"
        missing = [f.path for f in record.files if not os.path.exists(self._blobs.blob_path(f.sha256))]
        if missing:
            return f"lacks the stored bytes of {_describe(missing)} (corrupt or deleted; rerunning its producer restores them)"
        return None
