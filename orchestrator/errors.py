"""The engine's error hierarchy. The CLI prints these without a traceback and maps them to exit codes."""

from __future__ import annotations

from dataclasses import dataclass


class OrchestratorError(Exception):
    """Base class: the message says what went wrong and what to do."""

    exit_code = 1


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: where (file and line, or the override) and which field."""

    source: str  # "specs/demo.yaml:12" or "--set stages.prune.params.threshold=0"
    field: str  # dotted path, e.g. "stages.prune.params.threshold"
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.source}: {where}{self.message}"


class SpecError(OrchestratorError):
    """The spec is invalid; nothing was run or submitted."""

    exit_code = 2

    def __init__(self, issues: list[SpecIssue]) -> None:
        self.issues = issues
        noun = "error" if len(issues) == 1 else "errors"
        lines = [f"invalid spec ({len(issues)} {noun}); nothing was run or submitted:"]
        lines += [f"  {issue}" for issue in issues]
        super().__init__("\n".join(lines))


class ExecutorUnavailable(OrchestratorError):
    """The executor backend named in the spec cannot run here (e.g. no SLURM commands)."""


class BadArgument(OrchestratorError):
    """A command-line argument names something that does not exist (an artifact, a version)."""

    exit_code = 2
