"""Raw spec documents: YAML with the line of every field, command-line overrides, ``${...}`` references.

Everything here works on plain dicts and lists before validation, and remembers where each value
came from so that a validation error can name the file and line, or the ``--set`` that caused it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SpecError, SpecIssue

Loc = tuple[str | int, ...]
REF_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_\-]+)*)\}$")
SET_RE = re.compile(r"^(?P<path>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*)=(?P<value>.*)$", re.S)


@dataclass
class SpecSource:
    """A spec document plus where each of its fields came from."""

    path: Path
    data: dict[str, Any]
    lines: dict[Loc, str] = field(default_factory=dict)  # field -> "file:line"
    overrides: dict[Loc, str] = field(default_factory=dict)  # field -> the --set text that set it

    def where(self, loc: Loc) -> str:
        """``file:line`` (or the override) for the deepest known prefix of ``loc``."""
        for n in range(len(loc), -1, -1):
            prefix = loc[:n]
            if prefix in self.overrides:
                return f"--set {self.overrides[prefix]}"
            if prefix in self.lines:
                return self.lines[prefix]
        return str(self.path)

    def issue(self, loc: Loc, message: str) -> SpecIssue:
        return SpecIssue(self.where(loc), format_loc(loc), message)


def format_loc(loc: Iterable[str | int]) -> str:
    """``("stages", "prune", "matrix", 0)`` -> ``stages.prune.matrix[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_source(path: Path, _chain: tuple[Path, ...] = ()) -> SpecSource:
    """Read a YAML spec, recording the file and line of every mapping key and sequence item.

    ``extends: other.yaml`` (relative to this file) starts from another spec, patched with this one
    as a JSON merge patch (RFC 7386): mappings merge key by key, ``null`` removes a key, any other
    value replaces the other's.
    """
    data, lines = _read_yaml(path)
    base_name = data.pop("extends", None)
    lines.pop(("extends",), None)
    if base_name is None:
        return SpecSource(path=path, data=data, lines=lines)
    if not isinstance(base_name, str):
        raise SpecError([SpecIssue(f"{path}", "extends", "must be the path of another spec, relative to this one")])
    base_path = (path.parent / base_name).resolve()
    if base_path in _chain or base_path == path.resolve():
        raise SpecError([SpecIssue(f"{path}", "extends", f"{base_name} extends this spec again (a cycle)")])
    base = load_source(base_path, (*_chain, path.resolve()))
    return SpecSource(path=path, data=deep_merge(base.data, data), lines={**base.lines, **lines})


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base`` (RFC 7386): mappings merge recursively, ``None`` deletes,
    everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue(str(path), "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([SpecIssue(str(path), "", f"cannot read: {e}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([SpecIssue(where, "", f"invalid YAML: {problem}")]) from None
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(f"{path}:1", "", "a spec must be a YAML mapping (key: value)")])
    lines: dict[Loc, str] = {}
    duplicates: list[SpecIssue] = []
    _record_lines(node, (), lines, duplicates, path)
    if duplicates:
        raise SpecError(duplicates)
    return data, lines


def _record_lines(node: yaml.Node | None, loc: Loc, lines: dict[Loc, str], dups: list[SpecIssue], path: Path) -> None:
    """Map every field path to its file and line; a key given twice in one mapping is an error
    (YAML loaders silently keep the last one, which hides typos in long specs)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            line = f"{path}:{key_node.start_mark.line + 1}"
            if (*loc, key) in lines:
                first = lines[(*loc, key)].rsplit(":", 1)[1]
                dups.append(SpecIssue(line, format_loc((*loc, key)), f"given twice (first on line {first})"))
            lines[(*loc, key)] = line
            _record_lines(value_node, (*loc, key), lines, dups, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*loc, i)] = f"{path}:{item.start_mark.line + 1}"
            _record_lines(item, (*loc, i), lines, dups, path)


def apply_overrides(source: SpecSource, assignments: Iterable[str]) -> SpecSource:
    """Apply ``a.b.c=value`` overrides (the value is parsed as YAML) to a copy of ``source``."""
    data = copy.deepcopy(source.data)
    overrides = dict(source.overrides)
    issues: list[SpecIssue] = []
    for text in assignments:
        m = SET_RE.match(text)
        if not m:
            issues.append(SpecIssue(f"--set {text}", "", "expected FIELD.PATH=VALUE, e.g. executor.backend=slurm"))
            continue
        loc: Loc = tuple(m["path"].split("."))
        try:
            value = yaml.safe_load(m["value"]) if m["value"].strip() else ""
        except yaml.YAMLError as e:
            issues.append(SpecIssue(f"--set {text}", m["path"], f"value is not valid YAML: {e}"))
            continue
        problem = _assign(data, loc, value)
        if problem:
            issues.append(SpecIssue(f"--set {text}", m["path"], problem))
        overrides[loc] = text
    if issues:
        raise SpecError(issues)
    return SpecSource(path=source.path, data=data, lines=source.lines, overrides=overrides)


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


def resolve_refs(source: SpecSource, context: dict[str, Any], within: Loc) -> list[SpecIssue]:
    """Replace every string that is exactly ``${name.path}`` under ``within`` by the value it names.

    Only whole-value references are expanded (no string interpolation), so a reference can never
    splice text into a command or a path.
    """
    issues: list[SpecIssue] = []
    parent: Any = source.data
    for part in within[:-1]:
        parent = parent.get(part, {}) if isinstance(parent, dict) else {}
    if isinstance(parent, dict) and within[-1] in parent:
        parent[within[-1]] = _resolve(parent[within[-1]], context, source, within, issues)
    return issues


def _resolve(value: Any, context: dict[str, Any], source: SpecSource, loc: Loc, issues: list[SpecIssue]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, context, source, (*loc, k), issues) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, context, source, (*loc, i), issues) for i, v in enumerate(value)]
    if isinstance(value, str) and (m := REF_RE.match(value)):
        found, target = _lookup(context, m[1].split("."))
        if found:
            return copy.deepcopy(target)
        issues.append(source.issue(loc, f"{value} refers to nothing; valid references: {_ref_names(context)}"))
    return value


def _lookup(context: dict[str, Any], parts: list[str]) -> tuple[bool, Any]:
    node: Any = context
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _ref_names(context: dict[str, Any]) -> str:
    names = []
    for key, value in context.items():
        names.append(f"${{{key}}}")
        if isinstance(value, dict):
            names += [f"${{{key}.{sub}}}" for sub in value]
    return ", ".join(names)
