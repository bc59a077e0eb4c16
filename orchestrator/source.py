"""Raw spec documents: YAML with the line of every field, command-line overrides, ``${...}`` references.

Everything here works on plain dicts and lists before validation, and remembers where each value
came from so that a validation error can name the file and line, or the ``--set`` that caused it.
"""

from __future__ import annotations

import copy
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SpecError, SpecIssue

Loc = tuple[str | int, ...]
# matched with re.fullmatch: ``$`` alone would also match before a trailing newline
REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_\-]+)*)\}")

# Caps that keep a hostile spec from hanging or exhausting the machine; a real spec is far below all of them.
MAX_SPEC_BYTES = 10 * 2**20  # size of one spec file
MAX_YAML_NODES = 100_000  # values in a spec (with its extends: chain), each alias counted every time it is used
MAX_DEPTH = 64  # nesting levels of a YAML value (a real spec needs fewer than 10)
MAX_EXTENDS = 32  # specs in one extends: chain
MAX_SHOWN = 80  # characters of a --set shown in an error message


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
                return f"--set {shorten(self.overrides[prefix])}"
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


class YamlLimitError(Exception):
    """A YAML document over one of the caps (values, nesting) or with an alias that contains itself."""

    def __init__(self, message: str, mark: yaml.Mark | None = None) -> None:
        super().__init__(message)
        self.mark = mark


class SpecFileError(Exception):
    """A spec path that cannot be read as a spec: missing, not a regular file, too big, not UTF-8."""


def load_source(path: Path) -> SpecSource:
    """Read a YAML spec, recording the file and line of every mapping key and sequence item.

    ``extends: other.yaml`` (relative to this file) starts from another spec, patched with this one
    as a JSON merge patch (RFC 7386): mappings merge key by key, ``null`` removes a key, any other
    value replaces the other's.
    """
    try:
        text = read_spec_file(path)
    except SpecFileError as e:
        raise SpecError([SpecIssue(_shown_path(path), "", str(e))]) from None
    return _load_source(path, text, (), MAX_YAML_NODES)[0]


def _load_source(path: Path, text: str, chain: tuple[Path, ...], budget: int) -> tuple[SpecSource, int]:
    """The spec in ``text`` (read from ``path``) on top of the specs it extends, and how many YAML
    values they hold together (at most ``budget``)."""
    data, lines, used = _read_yaml(path, text, budget)
    base_name = data.pop("extends", None)
    where = lines.pop(("extends",), str(path))
    if base_name is None:
        return SpecSource(path=path, data=data, lines=lines), used
    base_path = _base_path(path, base_name, where, chain)
    try:
        base_text = read_spec_file(base_path)
    except SpecFileError as e:
        raise SpecError([SpecIssue(where, "extends", f"{_shown_path(Path(base_name))}: {e}")]) from None
    base, base_used = _load_source(base_path, base_text, (*chain, path.resolve()), budget - used)
    return SpecSource(path=path, data=deep_merge(base.data, data), lines={**base.lines, **lines}), used + base_used


def _base_path(path: Path, base_name: object, where: str, chain: tuple[Path, ...]) -> Path:
    """The file that ``extends: base_name`` in ``path`` names, or a SpecError saying why it cannot be."""

    def refuse(message: str) -> SpecError:
        return SpecError([SpecIssue(where, "extends", message)])

    if not isinstance(base_name, str) or not base_name:
        raise refuse("must be the path of another spec, relative to this one")
    if "\0" in base_name:
        raise refuse("the path contains a NUL byte; give the path of another spec, relative to this one")
    if len(chain) + 1 >= MAX_EXTENDS:
        raise refuse(f"more than {MAX_EXTENDS} specs extend one another; merge some of them into one file")
    try:
        base_path = (path.parent / base_name).resolve()
        this = path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise refuse(f"{base_name}: cannot resolve the path ({e})") from None
    if base_path in chain or base_path == this:
        raise refuse(f"{base_name} extends this spec again (a cycle)")
    return base_path


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


def read_spec_file(path: Path) -> str:
    """The text of a spec file. Only a regular file of at most MAX_SPEC_BYTES is read: a FIFO would
    block forever, ``/dev/zero`` never ends. Raises SpecFileError saying what is wrong."""
    if "\0" in str(path):
        raise SpecFileError("the path contains a NUL byte; give the path of a YAML file")
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise SpecFileError("file not found") from None
    except OSError as e:
        raise SpecFileError(f"cannot read: {e.strerror or e}") from None
    try:
        problem = _file_problem(os.fstat(fd))
        if problem:
            raise SpecFileError(problem)
        raw = _read_at_most(fd, MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecFileError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecFileError(_too_big())
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecFileError(f"cannot read: not UTF-8 text ({e})") from None


def _file_problem(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        kinds = [
            (stat.S_ISDIR, "a directory"),
            (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"),
        ]
        kind = next((name for test, name in kinds if test(st.st_mode)), "a special file")
        return f"not a regular file but {kind}; give the path of a YAML file"
    if st.st_size > MAX_SPEC_BYTES:
        return _too_big()
    return None


def _too_big() -> str:
    return f"larger than {MAX_SPEC_BYTES // 2**20} MiB, far more than a spec needs; is this the right file?"


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(2**20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _shown_path(path: Path) -> str:
    return str(path).replace("\0", "\\0")


class _CappedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose composer refuses to nest deeper than MAX_DEPTH levels, long before
    Python's recursion limit (PyYAML's composer recurses about three frames per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.depth >= MAX_DEPTH:
            raise YamlLimitError(_too_deep(), self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's, with the errors of its scalar constructors (a 5,000-digit integer, 2001-13-45,
        ``!!float x``) turned into YAML errors at the value's line instead of escaping as ValueError."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, OverflowError, TypeError) as e:
            problem = f"cannot read this value ({e.args[0] if e.args else type(e).__name__})"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _too_deep() -> str:
    return f"is nested more than {MAX_DEPTH} levels deep (YAML aliases expanded); a spec needs a handful: flatten it"


def _compose(loader: _CappedLoader, budget: int) -> tuple[yaml.Node | None, int]:
    """The document's node graph, checked against the caps, and the number of values it expands to."""
    node = loader.get_single_node()
    return node, (0 if node is None else count_nodes(node, budget))


def parse_yaml(text: str, budget: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load(text)`` under the caps: aliases expand to at most ``budget`` values, nesting
    to MAX_DEPTH levels, checked before any Python object is built. Raises yaml.YAMLError or
    YamlLimitError."""
    return _parse(text, budget)[0]


def _parse(text: str, budget: int, inspect: Callable[[yaml.Node | None], None] | None = None) -> tuple[Any, int]:
    """Parse once: compose the node graph, check it against the caps, show it to ``inspect``, then
    build the Python objects. Returns them and how many values they are (aliases expanded)."""
    loader = _CappedLoader(text)  # reads the text: may raise a ReaderError already
    try:
        node, used = _compose(loader, budget)
        if inspect is not None:
            inspect(node)
        return (None if node is None else loader.construct_document(node)), used
    except RecursionError:  # not expected within MAX_DEPTH levels; refuse all the same rather than crash
        raise YamlLimitError(_too_deep()) from None
    finally:
        loader.dispose()


@dataclass
class _Count:
    budget: int
    nodes: int = 0
    over: bool = False  # the budget was exceeded (and said so)


def count_nodes(node: yaml.Node, budget: int = MAX_YAML_NODES) -> int:
    """How many values ``node`` stands for, an alias counted each time it is used (what loading it
    builds and what validating it walks). Raises YamlLimitError past ``budget`` values, past
    MAX_DEPTH levels, or at an alias inside the collection it refers to; stops there, so an alias
    bomb costs at most ``budget`` steps."""
    count = _Count(budget)
    _count(node, 1, set(), count)
    return count.nodes


def _count(node: yaml.Node, depth: int, open_: set[int], count: _Count) -> None:
    count.nodes += 1
    if count.nodes > count.budget:
        raise YamlLimitError(
            f"holds more than {MAX_YAML_NODES:,} values once YAML aliases (*name) are expanded; a spec needs far fewer: "
            "do not nest aliases of large values",
            node.start_mark,
        )
    if isinstance(node, yaml.ScalarNode):
        return
    if id(node) in open_:
        raise YamlLimitError(
            "has a YAML alias (*name) inside the collection it refers to (a cycle); a spec must be finite", node.start_mark
        )
    if depth > MAX_DEPTH:
        raise YamlLimitError(_too_deep(), node.start_mark)
    children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
    open_.add(id(node))
    for child in children:
        _count(child, depth + 1, open_, count)
    open_.discard(id(node))


def _read_yaml(path: Path, text: str, budget: int) -> tuple[dict[str, Any], dict[Loc, str], int]:
    """The spec in ``text`` (read from ``path``), the file and line of every field, and how many
    values it holds. Parses once: compose, check the caps, record the lines, construct."""
    lines: dict[Loc, str] = {}
    duplicates: list[SpecIssue] = []
    try:  # lines are recorded before constructing: merge keys (<<) rewrite the nodes
        data, used = _parse(text, budget, lambda node: _record_lines(node, (), lines, duplicates, path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([SpecIssue(where, "", f"invalid YAML: {problem}")]) from None
    except YamlLimitError as e:
        raise SpecError([SpecIssue(f"{path}:{e.mark.line + 1}" if e.mark else str(path), "", f"the spec {e}")]) from None
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(f"{path}:1", "", "a spec must be a YAML mapping (key: value)")])
    if duplicates:
        raise SpecError(duplicates)
    return data, lines, used


def _record_lines(node: yaml.Node | None, loc: Loc, lines: dict[Loc, str], dups: list[SpecIssue], path: Path) -> None:
    """Map every field path to its file and line; a key given twice in one mapping is an error
    (YAML loaders silently keep the last one, which hides typos in long specs)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: constructing the document reports it
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


def shorten(text: str) -> str:
    """``text`` cut to MAX_SHOWN characters for an error message."""
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


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
        parent[within[-1]] = _resolve(parent[within[-1]], context, source, within, issues, _Count(MAX_YAML_NODES))
    return issues


def _resolve(value: Any, context: dict[str, Any], source: SpecSource, loc: Loc, issues: list[SpecIssue], copied: _Count) -> Any:
    """``value`` with its references replaced; ``copied`` counts the values they copy, which may not
    exceed its budget (many references to a large value would be a bomb of their own)."""
    if isinstance(value, dict):
        return {k: _resolve(v, context, source, (*loc, k), issues, copied) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, context, source, (*loc, i), issues, copied) for i, v in enumerate(value)]
    if not isinstance(value, str) or not (m := REF_RE.fullmatch(value)):
        return value
    found, target = _lookup(context, m[1].split("."))
    if not found:
        issues.append(source.issue(loc, f"{value} refers to nothing; valid references: {_ref_names(context)}"))
        return value
    copied.nodes += data_size(target, copied.budget - copied.nodes + 1)
    if copied.nodes > copied.budget:
        if not copied.over:  # say it once, at the first reference over the budget
            issues.append(
                source.issue(loc, f"references copy more than {copied.budget:,} values in all; refer to smaller values")
            )
            copied.over = True
        return value
    return copy.deepcopy(target)


def data_size(value: Any, limit: int) -> int:
    """How many values (containers included) ``value`` holds, counting stopped at ``limit``."""
    size, stack = 0, [value]
    while stack and size < limit:
        item = stack.pop()
        size += 1
        if isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return size


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
