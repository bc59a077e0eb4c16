"""``LocalStore.fsck``: check everything the store holds and, with ``repair``, put it right.

It reads every version record and hashes every blob once, reads every alias file and job record,
and reports what is wrong. ``repair`` acts on it, moving what is damaged to ``quarantine/`` (see
``quarantine``), never deleting it:

- a corrupt blob is quarantined: its versions then lack it, which a re-log of the same files (the
  producer's rerun) repairs, keeping their version numbers;
- an unreadable or unsafe version record is quarantined with its folder, and its number retired
  (``versions/v<N>.retired``): a version number never names two contents, so lineage that names
  the old one can never be taken for the new;
- a damaged alias file is quarantined (aliases that name missing versions are dropped);
- job records that cannot be read, or whose outputs are missing, damaged or corrupt, are dropped,
  and then, transitively, every job record whose input versions (its recorded ones, or for older
  records the inputs its output versions' producer names) are corrupt, removed or were produced
  only by a dropped job. A resubmit then recomputes exactly those jobs, and nothing else.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..procutil import alive
from .base import NAME_RE, ArtifactError, ArtifactRef, DamagedRecord, JobCommit
from .locking import file_lock
from .quarantine import quarantine
from .records import VersionRecord, manifest_digest

if TYPE_CHECKING:
    from .local import LocalStore


@dataclass
class FsckReport:
    """What ``LocalStore.fsck`` found, and with ``repair`` what it did. Every entry is one line."""

    removed_temp: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # "name:vN: reason": files missing or corrupt
    damaged: list[str] = field(default_factory=list)  # "path: reason": unreadable records, unsafe manifests
    dangling_jobs: list[str] = field(default_factory=list)  # "job_key: reason": outputs not all in place
    stale_jobs: list[str] = field(default_factory=list)  # "job_key: reason": built on a removed/corrupt version
    quarantined: list[str] = field(default_factory=list)  # repair: "what -> where" (blobs, versions, alias files)
    dropped_jobs: list[str] = field(default_factory=list)  # repair: "job_key: reason" (records moved to quarantine)
    unrepaired: list[str] = field(default_factory=list)  # repair: what could not be done, and why
    repaired: bool = False  # whether this was a repair run

    @property
    def ok(self) -> bool:
        """Nothing wrong was found."""
        return not (self.corrupt or self.damaged or self.dangling_jobs or self.stale_jobs)

    @property
    def healthy(self) -> bool:
        """Nothing wrong was found, or this repair run put everything found right: nothing counts
        as committed that is not intact (versions still lacking a quarantined blob get it back when
        the same files are logged again, e.g. by their producer's rerun)."""
        return self.ok or (self.repaired and not self.unrepaired)


@dataclass
class _Jobs:
    """The job records read, and which are dropped (with why) as the check goes."""

    commits: dict[str, JobCommit] = field(default_factory=dict)
    stats: dict[str, os.stat_result] = field(default_factory=dict)
    drop: dict[str, str] = field(default_factory=dict)


class Fsck:
    """One run of fsck over ``store``."""

    def __init__(self, store: LocalStore, repair: bool) -> None:
        self.store, self.repair = store, repair
        self.report = FsckReport(repaired=repair)
        self.bad: dict[ArtifactRef, str] = {}  # versions removed, damaged or corrupt -> why
        self._blob_ok: dict[str, bool] = {}  # each blob hashed once per run

    def run(self, temp_max_age_s: float) -> FsckReport:
        self._clean_tmp(temp_max_age_s)
        for name in self._names():
            for n in self.store._version_numbers(name):
                self._check_version(name, n)
            self._check_aliases(name)
        self._check_jobs()
        self.store._hashes.flush()  # the stamps of the blobs verified: later logs need not read them
        return self.report


    def _clean_tmp(self, max_age_s: float) -> None:
        """Remove staging entries of dead processes on this host, or older than ``max_age_s``."""
        host, now = socket.gethostname(), time.time()
        for entry in sorted((self.store.root / "tmp").iterdir()):
            owner_host, _, pid = entry.name.rpartition("-")[0].rpartition("-")
            dead = owner_host == host and pid.isdigit() and not alive(int(pid))
            try:
                if not dead and now - entry.lstat().st_mtime <= max_age_s:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:  # its owner just committed or removed it, or NFS keeps it busy
                continue
            self.report.removed_temp.append(entry.name)

    def _names(self) -> list[str]:
        folder = self.store.root / "artifacts"
        return sorted(n for n in os.listdir(folder) if NAME_RE.match(n) and len(n) <= 128 and (folder / n).is_dir())

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.store.root).as_posix()

    def _act(self, what: str, action: Callable[[], None]) -> None:
        """Run a repair ``action()``; a failure is reported, not raised (the rest still runs)."""
        try:
            action()
        except (OSError, ArtifactError) as e:
            self.report.unrepaired.append(f"{what}: {e}")

    # -------------------------------------------------------------------------------- versions
    def _check_version(self, name: str, number: int) -> None:
        ref, path = ArtifactRef(name, number), self.store._record_path(name, number)
        try:
            record = self.store._read_record(name, number)
        except DamagedRecord as e:
            self._damaged_version(ref, path, e.problem)
            return
        if manifest_digest(record.files) != record.digest:
            self._damaged_version(ref, path, "its digest does not match its file list")
            return
        self._check_blobs(ref, record)

    def _damaged_version(self, ref: ArtifactRef, path: Path, problem: str) -> None:
        self.report.damaged.append(f"{self._rel(path)}: {problem}")
        self.bad[ref] = "has a damaged record"
        if self.repair:
            self._act(f"quarantine {ref}", lambda: self._retire(ref))

    def _retire(self, ref: ArtifactRef) -> None:
        """Quarantine a version's folder and retire its number, under the artifact's lock."""
        vdir = self.store._art_dir(ref.name) / "versions"
        with file_lock(self.store._art_dir(ref.name) / "lock", self.store.lock_timeout_s):
            self.store._write_atomic(vdir / f"v{ref.version}.retired", f"{ref} was moved to quarantine by fsck --repair\n")
            moved = quarantine(self.store.root, vdir / f"v{ref.version}")
        self.store._views.forget(ref.name, ref.version)
        if moved is not None:
            self.report.quarantined.append(f"{ref} ({self._rel(vdir / f'v{ref.version}')}) -> {self._rel(moved)}")

    def _check_blobs(self, ref: ArtifactRef, record: VersionRecord) -> None:
        for f in record.files:
            if f.sha256 not in self._blob_ok:
                self._blob_ok[f.sha256] = self._verify_blob(f.sha256)
            if not self._blob_ok[f.sha256]:
                blob = self.store._blob(f.sha256)
                self.report.corrupt.append(f"{ref}: blob of {f.path} is missing or corrupt ({blob})")
                self.bad[ref] = "is corrupt (a file's stored bytes are missing or wrong)"
                return

    def _verify_blob(self, sha: str) -> bool:
        ok, judged = self.store._blobs.hash_blob(sha)
        if not ok and judged is not None and self.repair:
            moved = self.store._blobs.quarantine_blob(sha, judged)
            if moved is not None:
                self.report.quarantined.append(f"corrupt blob {self._rel(self.store._blob(sha))} -> {self._rel(Path(moved))}")
        return ok

    # --------------------------------------------------------------------------------- aliases
    def _check_aliases(self, name: str) -> None:
        path = self.store._art_dir(name) / "aliases.json"
        try:
            aliases = self.store._aliases(name)
        except DamagedRecord as e:
            self.report.damaged.append(f"{self._rel(path)}: {e.problem}")
            if self.repair:
                self._act(f"quarantine {self._rel(path)}", lambda: self._quarantine_aliases(name, path))
            return
        numbers = set(self.store._version_numbers(name))
        dangling = sorted(a for a, n in aliases.items() if n not in numbers)
        if dangling:
            self.report.damaged.append(f"{self._rel(path)}: aliases {', '.join(dangling)} name versions that do not exist")
            if self.repair:
                self._act(f"drop aliases of {name}", lambda: self.store._drop_aliases(name, dangling))

    def _quarantine_aliases(self, name: str, path: Path) -> None:
        with file_lock(self.store._art_dir(name) / "lock", self.store.lock_timeout_s):
            moved = quarantine(self.store.root, path)
        if moved is not None:
            self.report.quarantined.append(f"{self._rel(path)} -> {self._rel(moved)}")

    # ------------------------------------------------------------------------------------ jobs
    def _check_jobs(self) -> None:
        jobs = _Jobs()
        for path in sorted((self.store.root / "jobs").glob("*.json")):
            self._read_job(path, jobs)
        for key, commit in jobs.commits.items():
            problem = self._outputs_problem(commit.outputs.values())
            if problem is not None:
                self.report.dangling_jobs.append(f"{key}: {problem}")
                jobs.drop[key] = problem
        self._find_stale(jobs)
        if self.repair:
            for key, why in sorted(jobs.drop.items()):
                if key in jobs.commits:  # (unreadable ones were dropped as they were read)
                    self._act(f"drop job record {key}", functools.partial(self._drop, key, why, jobs.stats.get(key)))

    def _read_job(self, path: Path, jobs: _Jobs) -> None:
        key = path.stem
        try:
            st = os.stat(path)
            commit = self.store.job_record(key)
        except FileNotFoundError:  # removed since the listing (a concurrent drop): nothing to check
            return
        except (DamagedRecord, ArtifactError, OSError) as e:
            problem = e.problem if isinstance(e, DamagedRecord) else str(e)
            self.report.damaged.append(f"{self._rel(path)}: {problem}")
            if self.repair:
                self._act(f"drop job record {key}", lambda: self._drop_path(path, key, "unreadable record", None))
            return
        if commit is not None:
            jobs.commits[key], jobs.stats[key] = commit, st

    def _outputs_problem(self, outputs: Iterable[ArtifactRef]) -> str | None:
        missing, bad = [], []
        for ref in outputs:
            if ref in self.bad:
                bad.append(f"{ref} {self.bad[ref]}")
            elif not self._exists(ref):
                missing.append(str(ref))
        parts = ([f"outputs missing: {', '.join(missing)}"] if missing else []) + [f"output {b}" for b in bad]
        return "; ".join(parts) or None

    def _exists(self, ref: ArtifactRef) -> bool:
        try:
            return ref.version in self.store._version_numbers(ref.name)
        except ArtifactError:  # not a valid name
            return False

    def _find_stale(self, jobs: _Jobs) -> None:
        """Drop, until nothing changes, every job built on a tainted version: one that is removed,
        damaged or corrupt, or whose every recording job is dropped."""
        inputs = {key: self._inputs(commit) for key, commit in jobs.commits.items()}
        makers: dict[ArtifactRef, set[str]] = {}
        for key, commit in jobs.commits.items():
            for ref in commit.outputs.values():
                makers.setdefault(ref, set()).add(key)
        tainted = dict(self.bad)
        changed = True
        while changed:
            changed = False
            for ref, keys in makers.items():
                if ref not in tainted and keys <= jobs.drop.keys():
                    tainted[ref] = f"comes from dropped job {sorted(keys)[0]}"
                    changed = True
            for key in jobs.commits:
                hit = next((r for r in inputs[key] if r in tainted), None)
                if key not in jobs.drop and hit is not None:
                    jobs.drop[key] = f"input {hit} {tainted[hit]}"
                    self.report.stale_jobs.append(f"{key}: {jobs.drop[key]}")
                    changed = True

    def _inputs(self, commit: JobCommit) -> list[ArtifactRef]:
        """The versions a job consumed: recorded, or (older records) its outputs' producer's."""
        if commit.inputs is not None:
            return [ref for refs in commit.inputs.values() for ref in refs]
        found: list[ArtifactRef] = []
        for ref in commit.outputs.values():
            try:
                producer = self.store._read_record(ref.name, ref.version).producer
            except (DamagedRecord, ArtifactError):
                continue
            found += producer.inputs if producer is not None else ()
        return found

    def _drop(self, key: str, why: str, judged: os.stat_result | None) -> None:
        self._drop_path(self.store._job_path(key), key, why, judged)

    def _drop_path(self, path: Path, key: str, why: str, judged: os.stat_result | None) -> None:
        """Quarantine a job record, unless it was rewritten since it was read (a rerun's record)."""
        expect = None if judged is None else (judged.st_dev, judged.st_ino)
        if quarantine(self.store.root, path, expect=expect) is not None:
            self.report.dropped_jobs.append(f"{key}: {why}")
