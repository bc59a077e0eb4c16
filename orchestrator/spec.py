"""Typed study specs (Pydantic v2), validated in two passes.

1. The document itself (``Study``): unknown keys are errors, choices are listed.
2. Every stage against the stage registry: the stage exists, its params validate against the
   stage's own params model (with each matrix point merged in), its inputs name real stages.

Errors name the file, the field path and the YAML line (or the ``--set`` override) and list the
valid choices; the CLI prints them without a traceback and exits with code 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, StringConstraints, ValidationError, field_validator

from orchestrator.errors import SpecError, SpecIssue
from orchestrator.overrides import apply_overrides
from orchestrator.paths import default_root, storage_root_problem
from orchestrator.resources import ExecutorSpec as ExecutorSpec  # re-exported: the spec's own models
from orchestrator.resources import Resources as Resources
from orchestrator.resources import Strict, parse_selector
from orchestrator.source import Loc, SpecSource, load_source, resolve_refs
from orchestrator.stage import Registry, StageDef, load_registry
from orchestrator.sweep import SERVER_METHODS, SweepAxis, build_axes, drawn_points, schema_issues, split_name

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"  # pydantic's (Rust) regex: $ is the very end; re: use fullmatch
DEFAULT_MAX_JOBS = 100_000  # a plan of more jobs is refused unless asked for (--max-jobs N)
MATRIX_SEED = "seed"  # a matrix axis named "seed" sets the job seed, not a stage parameter
WandbTag = Annotated[str, StringConstraints(min_length=1, max_length=64)]  # what wandb.Settings.run_tags accepts


class TrackingSpec(Strict):
    backend: Literal["local", "wandb"] = "local"
    project: str | None = None
    entity: str | None = None
    mode: Literal["online", "offline"] | None = None
    reference_artifacts: bool = Field(
        False, description="wandb: log outputs as file:// reference artifacts (checksummed, not uploaded)"
    )
    tags: list[WandbTag] = Field(default_factory=list, description="wandb: tags of every run (+ the study name)")


class StorageSpec(Strict):
    root: Path = Field(
        default_factory=default_root, description="artifact store, job records and logs ($ORCHESTRATOR_STORE, else .orchestrator)"
    )


class ModelSpec(Strict):
    pretrained: str | None = Field(None, description="hub name or local path of a checkpoint")
    config: dict[str, Any] = Field(default_factory=dict, description="config of a model built from scratch")


class InputSpec(Strict):
    stage: str
    output: str | None = None


class StageSpec(Strict):
    """One entry of ``stages``: which registered stage it runs, its params, its matrix, its inputs."""

    stage: str | None = Field(None, description="registered stage to run (default: this entry's id)")
    params: dict[str, Any] = Field(default_factory=dict)
    matrix: dict[str, list[Any]] = Field(default_factory=dict)
    inputs: dict[str, str | InputSpec] = Field(default_factory=dict)
    seed: int | None = None
    collect: list[str] = Field(default_factory=list, description="sweep axes whose points this stage gathers")

    @field_validator("matrix")
    @classmethod
    def _non_empty_axes(cls, matrix: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for axis, values in matrix.items():
            if not values:
                raise ValueError(f"matrix axis {axis!r} has no values")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"matrix axis {axis!r} repeats a value")
        return matrix


class Study(Strict):
    """A validated study spec: its languages, model, data sources, stages (with their params,
    matrices and inputs), sweep, and where and how it runs (executor, tracking, storage)."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    languages: list[str] = Field(min_length=1)
    seed: int = 1234
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: dict[str, dict[str, Any]] = Field(default_factory=dict, description="named data sources")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    stage_package: str = Field("stages", description="Python package whose registry() defines the stages")
    stages: dict[str, StageSpec] = Field(min_length=1)
    sweep: dict[str, Any] | None = Field(None, description="a W&B sweep config over <stage>.<param> names")
    _source: SpecSource | None = PrivateAttr(None)  # where each field came from, for error messages

    @field_validator("languages")
    @classmethod
    def _unique_languages(cls, languages: list[str]) -> list[str]:
        if len(set(languages)) != len(languages):
            raise ValueError("languages repeat")
        return languages

    @field_validator("stages")
    @classmethod
    def _stage_ids(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        for sid in stages:
            if not re.fullmatch(NAME_PATTERN, sid):
                raise ValueError(f"stage id {sid!r} must be letters, digits, '_' or '-'")
        return stages

    def stage_name(self, stage_id: str) -> str:
        return self.stages[stage_id].stage or stage_id

    def issue(self, loc: Loc, message: str) -> SpecIssue:
        """A SpecIssue naming the file and line of ``loc`` when the study was loaded from a file."""
        if self._source is None:
            return SpecIssue("spec", ".".join(str(p) for p in loc), message)
        return self._source.issue(loc, message)

    def sweep_axes(self) -> list[SweepAxis]:
        """The sweep's axes (none without a sweep section); the config was checked by check_sweep."""
        return build_axes(self.sweep, self.seed) if self.sweep else []

    def spec_hash(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


REF_CONTEXT_FIELDS = ("name", "languages", "seed", "model", "data")


def load_study(
    path: Path,
    overrides: Iterable[str] = (),
    registry: Registry | None = None,
    *,
    max_jobs: int | None = DEFAULT_MAX_JOBS,
) -> tuple[Study, Registry]:
    """Load, override, resolve ``${...}`` references and validate a study spec, then check every
    stage against the registry (by default the one of the spec's ``stage_package``) and the storage
    root. ``max_jobs``: a random sweep drawing more points is refused before drawing them (None: no cap).

    Raises ``SpecError`` listing every problem found; nothing has run when it does.
    """
    source = apply_overrides(load_source(path), overrides)
    context = {k: source.data[k] for k in REF_CONTEXT_FIELDS if k in source.data}
    issues = resolve_refs(source, context, ("stages",))
    if issues:
        raise SpecError(issues)
    study = validate_model(Study, source.data, source)
    study._source = source
    if registry is None:
        try:
            registry = load_registry(study.stage_package)
        except ImportError as e:
            raise SpecError([source.issue(("stage_package",), str(e))]) from None
    check_stages(study, registry, source, max_jobs=max_jobs)
    return study, registry


def validate_model(model: type[BaseModel], data: Any, source: SpecSource, loc: Loc = ()) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError([_issue(model, err, source, loc) for err in e.errors()]) from None


def _issue(model: type[BaseModel], err: Any, source: SpecSource, prefix: Loc) -> SpecIssue:
    loc: Loc = (*prefix, *err["loc"])
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        valid = _fields_at(model, tuple(err["loc"][:-1]))
        message = "unknown field" + (f"; valid fields: {', '.join(valid)}" if valid else "")
    elif err["type"] == "missing":
        message = "required field is missing"
    elif "input" in err and not isinstance(err["input"], dict | list):
        message += f" (got {err['input']!r})"
    return source.issue(loc, message)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (sub)model found by walking ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        info = current.model_fields.get(part)
        if info is None:
            return []
        current = _inner_model(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside ``X``, ``X | None``, ``dict[str, X]`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def check_stages(study: Study, registry: Registry, source: SpecSource, *, max_jobs: int | None = DEFAULT_MAX_JOBS) -> None:
    """Check every stage entry against the registry, the sweep and the storage root, and the
    executor settings against what its backend requires; raise SpecError listing all problems."""
    from orchestrator.executors.registry import backend

    issues = check_storage_root(study, source)
    for sid, spec in study.stages.items():
        issues += _check_stage(study, sid, spec, registry, source)
    issues += check_sweep(study, registry, source, max_jobs=max_jobs)
    for key in study.executor.resources:
        stage_id = parse_selector(key)[0]
        if key != "default" and stage_id not in study.stages:
            choices = ", ".join(["default", *study.stages])
            issues.append(source.issue(("executor", "resources", key), f"no such stage; valid: {choices}"))
    issues += [source.issue(loc, message) for loc, message in backend(study.executor.backend).spec_problems(study)]
    if issues:
        raise SpecError(issues)


def check_storage_root(study: Study, source: SpecSource) -> list[SpecIssue]:
    """storage.root must be a directory, or a path that can become one (created when a job runs,
    not here): its nearest existing ancestor must be a directory."""
    problem = storage_root_problem(study.storage.root)
    return [source.issue(("storage", "root"), problem)] if problem else []


def count_text(n: int) -> str:
    """``1,000,000``; ``about 10^40`` for numbers too long to print (or to convert: ints over 4,300 digits)."""
    return f"{n:,}" if n < 10**15 else f"about 10^{int(n.bit_length() * math.log10(2))}"


def too_many_jobs(what: str, max_jobs: int) -> str:
    """The message for a plan over the job cap: ``what`` says how many jobs and where they come from."""
    return f"{what}, more than the {max_jobs:,} a plan may have; shrink the matrix or sweep, or pass --max-jobs N to allow more"


def check_sweep(
    study: Study, registry: Registry, source: SpecSource, *, max_jobs: int | None = DEFAULT_MAX_JOBS
) -> list[SpecIssue]:
    """The sweep section: W&B's schema, then our runner's rules (stage.param names, methods, values);
    a random sweep drawing more than ``max_jobs`` points is refused before they are drawn."""
    names = {a for spec in study.stages.values() for a in spec.collect}
    if study.sweep is None:
        return (
            [source.issue(("stages",), f"collect names sweep axes {sorted(names)} but the study has no sweep")] if names else []
        )
    issues = _check_sweep_config(study.sweep, source, max_jobs)
    for name in study.sweep["parameters"] if not issues else ():
        issues += _check_sweep_param(study, registry, source, name)
    if issues:
        return issues
    try:
        axes = build_axes(study.sweep, study.seed)
    except ValueError as e:
        return [source.issue(("sweep", "parameters"), str(e))]
    issues += _check_sweep_values(study, registry, source, axes)
    valid = {a.name for a in axes}
    for sid, spec in study.stages.items():
        for i, axis in enumerate(spec.collect):
            if axis not in valid:
                issues.append(
                    source.issue(("stages", sid, "collect", i), f"no sweep axis {axis!r}; axes: {', '.join(sorted(valid))}")
                )
    return issues


def _check_sweep_config(config: dict[str, Any], source: SpecSource, max_jobs: int | None) -> list[SpecIssue]:
    """W&B's sweep-config schema, then the methods the built-in runner can run, then the job cap."""
    issues = schema_issues(config, source)
    if issues:
        return issues
    method = config["method"]
    if method in SERVER_METHODS or method not in ("grid", "random"):
        reason = SERVER_METHODS.get(method, f"{method} is not supported")
        return [source.issue(("sweep", "method"), f"{reason}; the built-in runner does grid and random")]
    if method == "random" and "run_cap" not in config:
        return [source.issue(("sweep",), "method random needs run_cap: how many points to draw")]
    points = drawn_points(config)
    if max_jobs is not None and points > max_jobs:
        what = f"run_cap {count_text(points)} draws as many jobs per swept stage"
        return [source.issue(("sweep", "run_cap"), too_many_jobs(what, max_jobs))]
    return []


def _check_sweep_param(study: Study, registry: Registry, source: SpecSource, name: str) -> list[SpecIssue]:
    loc: Loc = ("sweep", "parameters", name)
    sid, param = split_name(name)
    if sid not in study.stages or not param:
        return [source.issue(loc, f"sweep parameters are named <stage id>.<param>; stages: {', '.join(study.stages)}")]
    stage_def = registry.get(study.stage_name(sid))
    fields = set(stage_def.params.model_fields) if stage_def else set()
    if param != MATRIX_SEED and param not in fields:
        return [source.issue(loc, f"stage {sid!r} has no parameter {param!r}; parameters: {', '.join(sorted(fields))}, seed")]
    if param in study.stages[sid].matrix or param in study.stages[sid].params:
        return [source.issue(loc, f"{param!r} is also set in stages.{sid}; set it in one place")]
    return []


def _check_sweep_values(study: Study, registry: Registry, source: SpecSource, axes: list[SweepAxis]) -> list[SpecIssue]:
    """Every swept value must validate as the stage parameter it sets."""
    issues: dict[SpecIssue, None] = {}  # a dict: ordered, and checking for a repeat stays cheap
    for axis in axes:
        for value in axis.values:
            for sid, _ in axis.targets:
                stage_def = registry.get(study.stage_name(sid))
                assigned = {k: v for k, v in axis.assignments(sid, value).items() if k != MATRIX_SEED}
                if stage_def is None or not assigned:
                    continue
                sample = {
                    **study.stages[sid].params,
                    **{a: v[0] for a, v in study.stages[sid].matrix.items() if a != MATRIX_SEED},
                }
                try:
                    stage_def.params.model_validate({**sample, **assigned})
                except ValidationError as e:
                    for err in e.errors():
                        where = ("sweep", "parameters", f"{sid}.{err['loc'][0]}") if err["loc"] else ("sweep",)
                        issue = source.issue(where, f"{err['msg']} (got {err.get('input')!r})")
                        issues[issue] = None
    return one_per_field(list(issues))


def _check_stage(study: Study, sid: str, spec: StageSpec, registry: Registry, source: SpecSource) -> list[SpecIssue]:
    loc: Loc = ("stages", sid)
    stage_def = registry.get(study.stage_name(sid))
    if stage_def is None:
        field = (*loc, "stage") if spec.stage else loc
        return [
            source.issue(field, f"no stage named {study.stage_name(sid)!r}; registered stages: {', '.join(registry.names())}")
        ]
    issues, valid_axes = _check_matrix(stage_def, spec, source, loc)
    issues += _check_params(stage_def.params, spec.params, valid_axes, source, loc)
    return issues + _check_inputs(study, stage_def, spec, source, loc)


def _check_matrix(
    stage_def: StageDef, spec: StageSpec, source: SpecSource, loc: Loc
) -> tuple[list[SpecIssue], dict[str, list[Any]]]:
    """Problems with the matrix axes, and the axes that are fine (to validate params with)."""
    issues: list[SpecIssue] = []
    fields = set(stage_def.params.model_fields)
    valid_axes = {}
    for axis, values in spec.matrix.items():
        where = (*loc, "matrix", axis)
        if axis == MATRIX_SEED and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            issues.append(source.issue(where, f"seeds must be integers (got {values!r})"))
        elif axis != MATRIX_SEED and axis not in fields:
            params = ", ".join(sorted(fields)) or "none"
            issues.append(source.issue(where, f"not a parameter of stage {stage_def.name!r}; parameters: {params}"))
        elif axis in spec.params:
            issues.append(source.issue(where, f"also set in params; set {axis!r} in one place"))
        else:
            valid_axes[axis] = values
    return issues, valid_axes


def _check_inputs(study: Study, stage_def: StageDef, spec: StageSpec, source: SpecSource, loc: Loc) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    for name in spec.inputs:
        if name not in stage_def.inputs:
            declared = ", ".join(stage_def.inputs) or "none"
            issues.append(
                source.issue((*loc, "inputs", name), f"stage {stage_def.name!r} has no input {name!r}; inputs: {declared}")
            )
    for name, decl in stage_def.inputs.items():
        upstream = input_stage(study, spec, name)
        if upstream is None and not decl.optional:
            issues.append(source.issue((*loc, "inputs"), f"input {name!r} is not connected; add inputs: {{{name}: <stage id>}}"))
        elif upstream is not None and upstream not in study.stages:
            issues.append(
                source.issue((*loc, "inputs", name), f"no stage {upstream!r} in this study; stages: {', '.join(study.stages)}")
            )
    return issues


def _check_params(
    params_model: type[BaseModel], params: dict[str, Any], matrix: dict[str, list[Any]], source: SpecSource, loc: Loc
) -> list[SpecIssue]:
    """Validate params once per matrix value (validating the full product would be slow)."""
    axes = {axis: values for axis, values in matrix.items() if axis != MATRIX_SEED}
    first = {**params, **{axis: values[0] for axis, values in axes.items()}}
    samples = [first] + [{**first, axis: v} for axis, values in axes.items() for v in values[1:]]
    issues: dict[SpecIssue, None] = {}  # a dict: ordered, and checking for a repeat stays cheap
    for sample in samples:
        try:
            params_model.model_validate(sample)
        except ValidationError as e:
            for err in e.errors():
                in_matrix = bool(err["loc"]) and err["loc"][0] in matrix
                issue = _issue(params_model, err, source, (*loc, "matrix" if in_matrix else "params"))
                issues[issue] = None
    return one_per_field(list(issues))


def one_per_field(issues: list[SpecIssue]) -> list[SpecIssue]:
    """The first issue of each field, saying how many more there are: a matrix or sweep of 10,000
    bad values gives one error, not 10,000."""
    by_field: dict[tuple[str, str], list[SpecIssue]] = {}
    for issue in issues:
        by_field.setdefault((issue.source, issue.field), []).append(issue)
    out = []
    for same in by_field.values():
        more = f"; {len(same) - 1:,} more values of this field are invalid too" if len(same) > 1 else ""
        out.append(replace(same[0], message=same[0].message + more))
    return out


def input_stage(study: Study, spec: StageSpec, name: str) -> str | None:
    """The upstream stage id wired to input ``name``; an unwired input defaults to the stage of that id."""
    wired = spec.inputs.get(name)
    if wired is None:
        return name if name in study.stages else None
    return wired if isinstance(wired, str) else wired.stage


def input_output(spec: StageSpec, name: str) -> str | None:
    """The upstream output chosen for input ``name``, if the spec names one."""
    wired = spec.inputs.get(name)
    return wired.output if isinstance(wired, InputSpec) else None
