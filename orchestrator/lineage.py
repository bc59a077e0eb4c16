"""Whether a job's committed result is still current, and if not, why.

A job is *current* when its record in the store exists and is readable, every output version it
names exists with its blobs in place, and the input versions it was computed from are exactly the
versions its upstream jobs record now. The last clause is what a job key alone cannot promise: a
key covers the upstream *keys*, so an upstream job rerun with ``--force`` (or by another study
sharing the store) that produced a new version leaves the downstream key unchanged, and only the
recorded input versions reveal that the downstream result was built from the old one (as
``dvc.lock`` records the hashes of a stage's dependencies).

Records written before input versions were recorded have no ``inputs``; for them the inputs named
by the producer of their output versions stand in (what the bytes were computed from), and a record
with neither is trusted as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.artifacts import ArtifactRef, ArtifactStore, JobCommit

InputVersions = dict[str, tuple[ArtifactRef, ...]]
NOT_RUN = "not run yet"
FORCED = "forced"
_AFTER = "after upstream "


def went_stale(reason: str) -> bool:
    """Whether ``reason`` (for a job to run) says that a committed result is no longer current,
    news worth telling, rather than that it never ran, was forced, or waits for its upstream."""
    return reason not in (NOT_RUN, FORCED) and not reason.startswith(_AFTER)


class _Upstream(Protocol):
    @property
    def job_key(self) -> str: ...

    @property
    def output(self) -> str: ...


class _Binding(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def upstream(self) -> Sequence[_Upstream]: ...


class _Job(Protocol):
    """A planned job (``plan.Job``) or a job's run record (``records.JobRecord``)."""

    @property
    def key(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def inputs(self) -> Sequence[_Binding]: ...


@dataclass
class LineageCheck:
    """Verdicts on jobs against one store, reading each job record once."""

    store: ArtifactStore
    _records: dict[str, JobCommit | None] = field(default_factory=dict)

    def record(self, key: str) -> JobCommit | None:
        if key not in self._records:
            self._records[key] = self.store.job_record(key)
        return self._records[key]

    def current_inputs(self, bindings: Iterable[_Binding]) -> InputVersions | str:
        """The versions each input binding would resolve to now, or why it cannot resolve."""
        out: InputVersions = {}
        for binding in bindings:
            refs = []
            for up in binding.upstream:
                commit = self.record(up.job_key)
                if commit is None or up.output not in commit.outputs:
                    return f"upstream job {up.job_key[:12]} has no committed output {up.output!r}"
                refs.append(commit.outputs[up.output])
            out[binding.name] = tuple(refs)
        return out

    def problem(self, key: str, bindings: Iterable[_Binding]) -> str | None:
        """None if job ``key`` is current against its upstream jobs' records now, else why not."""
        commit = self.record(key)
        if commit is None:
            return NOT_RUN
        missing = self.store.outputs_problem(commit.outputs)  # the record is read once, above
        if missing is not None:
            return missing
        now = self.current_inputs(bindings)
        if isinstance(now, str):
            return f"stale: {now}"
        return stale_reason(self.recorded_inputs(key, commit), now)

    def recorded_inputs(self, key: str, commit: JobCommit) -> InputVersions | None:
        """The input versions job ``key``'s commit was computed from (None: unknown, an old record
        whose outputs were all first produced by another job with the same content)."""
        if commit.inputs is not None:
            return commit.inputs
        for ref in commit.outputs.values():
            producer = self.store.get(ref).producer
            if producer is not None and producer.job_key == key:
                return {"": tuple(producer.inputs)}
        return None

    def plan_problems(self, jobs: Sequence[_Job], force: bool = False) -> dict[str, str]:
        """Job key -> why it must run, for every job of ``jobs`` (in topological order) that is not
        current. A job below one that runs is not current either: its inputs may change (the
        runner checks again once they are committed, and reuses its result if they did not)."""
        if force:
            return {job.key: FORCED for job in jobs}
        problems: dict[str, str] = {}
        labels = {job.key: job.label for job in jobs}
        for job in jobs:
            upstream = [u.job_key for b in job.inputs for u in b.upstream]
            first = next((u for u in upstream if u in problems), None)
            if self.record(job.key) is None:
                problems[job.key] = NOT_RUN
            elif first is not None:
                problems[job.key] = f"{_AFTER}{labels[first]}; reused if that changes nothing"
            elif (problem := self.problem(job.key, job.inputs)) is not None:
                problems[job.key] = problem
        return problems


def stale_reason(recorded: InputVersions | None, now: Mapping[str, tuple[ArtifactRef, ...]]) -> str | None:
    """Why inputs ``now`` differ from the ``recorded`` ones (None if they do not, or if nothing
    was recorded). Old records hold the producer's flat input list under the key ""."""
    if recorded is None:
        return None
    if set(recorded) == {""}:  # an old record: compare as one flat list
        flat = tuple(ref for refs in now.values() for ref in refs)
        return None if sorted(flat) == sorted(recorded[""]) else _describe("inputs", recorded[""], flat)
    for name in sorted(set(recorded) | set(now)):
        was, is_ = recorded.get(name, ()), now.get(name, ())
        if was != is_:
            return _describe(f"input {name}", was, is_)
    return None


def _describe(what: str, was: Sequence[ArtifactRef], now: Sequence[ArtifactRef]) -> str:
    if len(was) == len(now) == 1:
        built = f"v{was[0].version}" if was[0].name == now[0].name else str(was[0])
        return f"stale: {what} is {now[0]}, was built from {built}"
    added = ", ".join(str(r) for r in now if r not in was) or "none"
    gone = ", ".join(str(r) for r in was if r not in now) or "none"
    return f"stale: {what} now include {added}, was built from {gone} instead"
