"""Stage checks (``StageDef.check``, see ``CheckFn``): what a stage can tell is wrong with a job's
params without running it, reported as spec errors before anything is written or submitted.

Each check runs once per distinct (check, params) in a process: a matrix of many points over one
stage asks once per distinct params, and building the same plan again (as sweeps do) asks nothing
new. A problem naming one parameter (``"languages: ..."``) is reported at the line that sets it:
the stage's matrix axis, the sweep parameter or the stage's params, in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.errors import OrchestratorError, SpecIssue
from orchestrator.source import Loc
from orchestrator.spec import Study, canonical_json
from orchestrator.stage import CheckFn, StageDef

_answers: dict[tuple[CheckFn, str], tuple[str, ...]] = {}


class CheckFailed(OrchestratorError):
    """A stage's check raised: a bug in the stage package, not a problem of the spec."""


def stage_problems(stage_def: StageDef, params: Mapping[str, Any]) -> tuple[str, ...]:
    """What ``stage_def.check`` says about a job with ``params`` (validated, JSON form); cached."""
    check = stage_def.check
    if check is None:
        return ()
    key = (check, canonical_json(params))
    if key not in _answers:
        _answers[key] = _ask(stage_def, check, params)
    return _answers[key]


def _ask(stage_def: StageDef, check: CheckFn, params: Mapping[str, Any]) -> tuple[str, ...]:
    try:
        return tuple(str(problem) for problem in check(stage_def.params.model_validate(dict(params))))
    except Exception as e:  # any exception: the stage's bug, reported in one line instead of a traceback
        text = (str(e).strip().splitlines() or [""])[0]
        raise CheckFailed(
            f"the check of stage {stage_def.name!r} raised {type(e).__name__}{': ' + text if text else ''}; "
            f"that is a bug in the stage (its check function), not in the spec: fix or report the stage"
        ) from None


def problem_issue(study: Study, sid: str, stage_def: StageDef, label: str | None, problem: str) -> SpecIssue:
    """The spec issue for ``problem`` of stage ``sid``'s job ``label`` (None: the stage has one job):
    at the parameter the problem names, else at the stage's params. The job is named where the
    problem may differ between the stage's jobs: a parameter of its matrix or sweep, or no parameter."""
    name, sep, rest = problem.partition(": ")
    if sep and name in stage_def.params.model_fields:
        loc, text = param_loc(study, sid, name), rest
        label = label if loc[0] == "sweep" or loc[2] == "matrix" else None
    else:
        loc, text = ("stages", sid, "params"), problem
    return study.issue(loc, f"at {label}: {text}" if label else text)


def param_loc(study: Study, sid: str, param: str) -> Loc:
    """Where parameter ``param`` of stage ``sid`` is set: its matrix axis, its sweep parameter, or its params."""
    if param in study.stages[sid].matrix:
        return ("stages", sid, "matrix", param)
    if f"{sid}.{param}" in (study.sweep or {}).get("parameters", {}):
        return ("sweep", "parameters", f"{sid}.{param}")
    return ("stages", sid, "params", param)
