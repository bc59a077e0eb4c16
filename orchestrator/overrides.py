"""``--set FIELD.PATH=VALUE`` overrides: each value parsed as YAML under the spec's caps, assigned
into a copy of the spec, and remembered so that errors name the override rather than a line."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SpecError, SpecIssue
from orchestrator.source import MAX_DEPTH, Loc, SpecSource, YamlLimitError, format_loc, parse_yaml, shorten

SET_RE = re.compile(r"(?P<path>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*)=(?P<value>.*)", re.S)


def apply_overrides(source: SpecSource, assignments: Iterable[str]) -> SpecSource:
    """Apply ``a.b.c=value`` overrides (the value is parsed as YAML) to a copy of ``source``."""
    data = copy.deepcopy(source.data)
    overrides = dict(source.overrides)
    issues: list[SpecIssue] = []
    for text in assignments:
        where = f"--set {shorten(text)}"
        m = SET_RE.fullmatch(text)
        if not m:
            issues.append(SpecIssue(where, "", "expected FIELD.PATH=VALUE, e.g. executor.backend=slurm"))
            continue
        loc: Loc = tuple(m["path"].split("."))
        value, problem = _override_value(loc, m["value"])
        problem = problem or _assign(data, loc, value)
        if problem:
            issues.append(SpecIssue(where, shorten(m["path"]), problem))
            continue
        overrides[loc] = text
    if issues:
        raise SpecError(issues)
    return SpecSource(path=source.path, data=data, lines=source.lines, overrides=overrides)


def _override_value(loc: Loc, text: str) -> tuple[Any, str | None]:
    """The value of a ``--set`` (YAML, under the spec's caps), or what is wrong with it."""
    if len(loc) > MAX_DEPTH:
        return None, f"a field path of more than {MAX_DEPTH} parts; no spec field is that deep"
    if not text.strip():
        return "", None
    try:
        return parse_yaml(text), None
    except yaml.YAMLError as e:
        return None, f"value is not valid YAML: {e}"
    except YamlLimitError as e:
        return None, f"the value {e}"


def _assign(data: dict[str, Any], loc: Loc, value: Any) -> str | None:
    node: Any = data
    for i, part in enumerate(loc[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"cannot set a field inside {format_loc(loc[: i + 1])}, which is not a mapping"
        node = child
    node[loc[-1]] = value
    return None


def cli_overrides(overrides: Sequence[str], executor: str | None, store: Path | None) -> list[str]:
    """The overrides that the CLI's spec options mean: ``--set`` ones, then ``--executor`` and
    ``--store`` as the fields they set."""
    out = list(overrides)
    if executor:
        out.append(f"executor.backend={executor}")
    if store:
        out.append(f"storage.root={store}")
    return out
