"""The contract between the engine and the science: how a stage is declared and what it receives.

A stage is a plain function ``fn(params, inputs, ctx) -> metadata | None``:

- ``params`` is an instance of the stage's Pydantic parameter model (validated from the spec,
  with the job's matrix point merged in);
- ``inputs`` maps each declared input name to a :class:`ResolvedInput` (or, for ``many=True``
  inputs, a list of them, ordered by the producing job's matrix point);
- ``ctx`` is a :class:`StageContext`: where to write each output, where to log metrics, the seed,
  a persistent checkpoint directory, a flag that says the job was asked to stop, and where to
  report progress (``ctx.progress(done, total, unit)``; stages print no progress bars).

The function writes each declared output into ``ctx.output_dir(name)`` and may return a mapping
``output name -> metadata dict`` that is stored with that artifact version. The engine commits the
outputs as artifact versions after the function returns; a stage never sees the artifact store,
the executor or the tracking backend.

Stage modules must not import heavy libraries (torch, transformers, ...) at import time: the
engine imports every stage module to plan a study, and planning must stay fast.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


class StageParams(BaseModel):
    """Base class for stage parameter models: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Input:
    """A declared stage input.

    ``type`` is the artifact type the input must have. ``many=True`` gathers the matching output of
    every upstream job (e.g. one head mask per language); otherwise exactly one upstream job must match.
    """

    type: str
    many: bool = False
    optional: bool = False


@dataclass(frozen=True)
class ResolvedInput:
    """One input artifact version, resolved by lineage and materialised read-only on disk."""

    name: str  # artifact name, e.g. "demo.prune.language=en"
    version: int
    type: str
    path: Path  # directory holding the artifact's files (read-only: never write here)
    metadata: Mapping[str, Any]
    point: Mapping[str, Any]  # matrix point of the job that produced it ({} for unmatrixed stages)
    job_key: str

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"


Inputs = Mapping[str, "ResolvedInput | list[ResolvedInput]"]


PROVENANCE = """\
``StageContext.provenance``: what produced a job and every artifact version upstream of it::

    {"study": "demo", "spec_path": "/abs/specs/demo.yaml" | None, "spec_hash": "...",
     "code": {"git_commit": "<sha>[+dirty]" | None, "python": "3.12.1", "packages": {"torch": "..."}},
     "job": {"label": "...", "stage": "...", "stage_version": "...", "params": {...}, "seed": 0},
     "upstream": [   # every ancestor version of the job's inputs, once each, producers first
        {"ref": "demo.train.model:v0", "type": "model", "job_label": "train", "stage": "train",
         "stage_version": "3" | None, "params": {...} | None, "seed": 1234 | None,
         "spec_hash": "..." | None, "git_commit": "..." | None, "created_at": "...",
         "inputs": ["demo.tokenize.dataset:v0", ...]}]}

Fields are None where an older version did not record them.
"""


class StageContext(Protocol):
    """What the engine hands a running stage."""

    seed: int
    job_label: str
    checkpoint_dir: Path  # persists across retries and requeues of the same job key
    stop_requested: threading.Event  # set on SIGTERM/SIGUSR2: checkpoint and raise StageInterrupted
    # What produced this job and everything upstream of it, as plain JSON data (see PROVENANCE)
    provenance: Mapping[str, Any]
    gpus: int  # GPUs the job asked for (executor.resources.<stage>.gpus); 0: it asked for none
    rank: int  # this process's rank among the job's processes (0 of 1 unless resources.processes > 1)
    world_size: int  # how many processes run the stage together (only rank 0's outputs are committed)

    def output_dir(self, name: str) -> Path:
        """An empty directory to write output ``name`` into (created on first call)."""
        ...

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics in the job's tracking run."""
        ...

    def progress(self, done: int, total: int | None = None, unit: str = "step") -> None:
        """Say how far the stage is: ``done`` of ``total`` units (None: a total not known). Cheap
        enough to call every step: the engine keeps the latest in the job's ``progress.json`` (what
        ``status`` and ``submit`` show), writes one plain line per update to the job log (the first,
        every ~10 s or tenth of the total, and the last: ``prune[language=en]: 120/800 steps (15%),
        3.2 steps/s, ETA 3m 32s``) and measures the rate. A new ``total`` or ``unit`` starts a new
        phase (e.g. batches loaded, then steps trained). Only rank 0's calls are kept. Raises
        ValueError for negative or non-integer counts."""
        ...


class StageInterrupted(Exception):
    """Raised by a stage that checkpointed after ``ctx.stop_requested`` was set.

    The runner exits with a distinct code so that the executor can requeue the job; the next
    attempt finds the checkpoint in ``ctx.checkpoint_dir``.
    """


StageFn = Callable[[Any, Inputs, StageContext], "Mapping[str, Mapping[str, Any]] | None"]
# ``prefetch(params) -> things fetched``: downloads what a job with these (validated) params loads by
# name (models, tokenizers, datasets) into the local caches, so that jobs can run without network.
# A generator yields one human-readable line per thing as soon as it is fetched (progress).
PrefetchFn = Callable[[Any], Iterable[str]]
# ``check(params) -> problems``: what is wrong with a job of these (validated) params that can be known
# without running it, e.g. a language the chosen source does not have. It runs at validate/plan/submit
# time, once per distinct params (the engine caches it), so it must be fast and use no network; where
# the answer is not knowable offline it says nothing. A problem about one parameter starts with that
# parameter's name and a colon ("languages: bible has no 'xx'; ..."): the engine reports it as a spec
# error at that parameter's line (else at the stage's params), and nothing runs. A check that raises is
# a bug in the stage: the engine reports it as such, in one line.
CheckFn = Callable[[Any], Iterable[str]]


@dataclass(frozen=True)
class StageDef:
    """A stage as the engine sees it: a name, typed parameters, typed inputs and outputs, a version.

    Bump ``version`` whenever a code change alters what the stage produces: it is part of every job
    key, so bumping it reruns the stage and everything downstream.
    """

    name: str
    fn: StageFn
    params: type[BaseModel]
    inputs: Mapping[str, Input] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)  # output name -> artifact type
    version: str = "1"
    description: str = ""
    checkpoints: bool = False  # True: the stage watches ctx.stop_requested and checkpoints
    prefetch: PrefetchFn | None = None  # see PrefetchFn; None: the stage loads nothing by name
    check: CheckFn | None = None  # see CheckFn; None: nothing to check beyond the params model


def stage(
    name: str,
    *,
    params: type[BaseModel],
    inputs: Mapping[str, Input] | None = None,
    outputs: Mapping[str, str],
    version: str = "1",
    checkpoints: bool = False,
    prefetch: PrefetchFn | None = None,
    check: CheckFn | None = None,
) -> Callable[[StageFn], StageDef]:
    """Decorator turning a function into a :class:`StageDef` (it does not register it anywhere).

    ``checkpoints=True`` declares that the stage polls ``ctx.stop_requested``, saves a checkpoint
    and raises :class:`StageInterrupted`; other stages are stopped at once by SIGTERM/SIGUSR2.
    ``prefetch``: what ``python -m orchestrator prefetch`` calls once per distinct params (see PrefetchFn).
    ``check``: what ``validate``, ``plan`` and ``submit`` call once per distinct params (see CheckFn).
    """

    def wrap(fn: StageFn) -> StageDef:
        doc = (fn.__doc__ or "").strip().splitlines()
        return StageDef(
            name=name,
            fn=fn,
            params=params,
            inputs=dict(inputs or {}),
            outputs=dict(outputs),
            version=version,
            description=doc[0] if doc else "",
            checkpoints=checkpoints,
            prefetch=prefetch,
            check=check,
        )

    return wrap


class Registry:
    """Stage definitions by name. Built explicitly (no import-time global registration)."""

    def __init__(self, stages: list[StageDef] | tuple[StageDef, ...] = ()) -> None:
        self._stages: dict[str, StageDef] = {}
        for s in stages:
            self.add(s)

    def add(self, s: StageDef) -> None:
        if s.name in self._stages:
            raise ValueError(f"stage {s.name!r} is defined twice")
        self._stages[s.name] = s

    def get(self, name: str) -> StageDef | None:
        return self._stages.get(name)

    def names(self) -> list[str]:
        return sorted(self._stages)

    def __iter__(self) -> Iterator[StageDef]:
        return iter(self._stages.values())

    def __contains__(self, name: object) -> bool:
        return name in self._stages


def load_registry(package: str) -> Registry:
    """Import ``package`` and call its ``registry()``; the one way the engine finds stages."""
    import importlib

    try:
        module = importlib.import_module(package)
    except (ImportError, ValueError, TypeError) as e:  # "" and ".x" raise ValueError/TypeError
        raise ImportError(f"cannot import stage package {package!r} ({e}); is it installed or on PYTHONPATH?") from e
    from orchestrator.stage_origin import check_origin

    check_origin(package, module)  # another `stages` (a folder in the cwd, another distribution's) in place of ours
    factory = getattr(module, "registry", None)
    if not callable(factory):
        raise ImportError(f"stage package {package!r} has no registry() function returning a Registry")
    registry = factory()
    if not isinstance(registry, Registry):
        raise ImportError(f"{package}.registry() returned {type(registry).__name__}, not a Registry")
    return registry
