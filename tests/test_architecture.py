"""The layering the README's Architecture section draws, checked on the source itself (ast, no
imports run): who may import whom, no import cycles (function-level imports included), no module
over the size a reader can hold, and no backend picked by name outside the executors' registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("orchestrator", "stages")
MAX_LINES = 450
BACKENDS = ("local", "slurm")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (top level or inside functions)."""
    out: set[str] = set()
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(edges.get(start, ()))
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo += edges.get(v, ())
    return seen


def on_cycles(edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each module that imports itself through others -> the modules of its cycle."""
    reach = {v: reachable(edges, v) for v in edges}
    return {v: sorted(w for w in reach[v] if v in reach[w]) for v in sorted(edges) if v in reach[v]}


def is_package_init(name: str, w: str) -> bool:
    """``a.b`` imported by ``a.b.c``: a package's ``__init__`` re-exporting its own modules is not a cycle."""
    return name.startswith(w + ".")


def test_the_import_graph_has_no_cycle() -> None:
    edges = {name: {w for w in deps if not is_package_init(name, w) and not is_package_init(w, name)} for name, deps in graph().items()}
    assert on_cycles(edges) == {}


def test_stages_import_only_the_stage_api_and_the_engine_never_imports_the_science() -> None:
    for name, deps in graph().items():
        if name.startswith("stages"):
            engine = {d for d in deps if d.startswith("orchestrator")}
            assert engine <= {"orchestrator", "orchestrator.stage"}, (name, engine)
        else:
            assert not {d for d in deps if d.startswith("stages")}, name


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_longer_than_a_reader_can_hold(name: str) -> None:
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it along a real seam"


def test_no_backend_is_picked_by_name_outside_the_executors() -> None:
    """``backend == "slurm"`` and the like belong to the registry; elsewhere an executor's methods answer."""
    found = []
    for name, path in modules().items():
        if name.startswith(("orchestrator.executors", "orchestrator.tracking")):  # (tracking: its own "local")
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                if any(isinstance(p, ast.Constant) and p.value in BACKENDS for p in parts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_a_third_backend_is_one_file_and_one_registry_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tests/toybackend is a whole backend; registered, the CLI submits to it, shows its jobs'
    status and has nothing to cancel, with no change to cli, views or runner."""
    from conftest import TOY_SPEC

    from orchestrator.cli import main
    from orchestrator.executors import registry

    registry.register("inline", "toybackend:InlineExecutor")
    try:
        spec = tmp_path / "toy.yaml"
        spec.write_text(TOY_SPEC + "executor: {backend: inline}\n")
        store = str(tmp_path / "store")
        assert main(["submit", str(spec), "--store", store]) == 0
        assert "7 succeeded" in capsys.readouterr().out
        assert main(["status", "toy", "--store", store]) == 0
        assert capsys.readouterr().out.count("inline, in the submitting process") == 7
        assert main(["cancel", "toy", "--store", store]) == 1  # no backend has anything of it to stop
        assert "has nothing an executor could cancel" in capsys.readouterr().err
    finally:
        registry.BACKENDS.pop("inline")
