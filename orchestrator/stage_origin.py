"""Is the imported ``stages`` this project's stage package?

The distribution ships its stages as the top-level package ``stages`` (a spec's default
``stage_package``), a common name: a folder ``stages/`` in the working directory shadows it under
``python -m orchestrator`` (the working directory comes first on ``sys.path``), and PyPI's unrelated
``stages`` distribution would install over it. Ours says so with a marker attribute in its
``__init__.py``; a package of that name without it is refused with one line naming where it came from
and what to do. Stage packages of other names (``stage_package: mystages``) are not checked.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from orchestrator.errors import OrchestratorError

BUNDLED = "stages"  # the stage package this distribution ships
MARKER = "__cross_lingual_subnets__"  # set (True) in its __init__.py
DISTRIBUTION = "cross-lingual-subnets"


class ForeignStagePackage(OrchestratorError):
    """The package imported as ``stages`` is not this project's; nothing was run."""

    exit_code = 2


def check_origin(package: str, module: ModuleType) -> None:
    """Raise ForeignStagePackage if ``module``, imported as ``package``, is a ``stages`` other than ours."""
    if package != BUNDLED or getattr(module, MARKER, False) is True:
        return
    where = imported_from(module)
    raise ForeignStagePackage(
        f"stage package {package!r} was imported from {where}, which is not this project's stages package: {remedy(where)}"
    )


def imported_from(module: ModuleType) -> Path:
    """The file a package was imported from (its folder for a namespace package, which has no file)."""
    if module.__file__:
        return Path(module.__file__)
    return Path(next(iter(getattr(module, "__path__", [])), "?"))


def remedy(where: Path) -> str:
    """What to do about a foreign ``stages`` found at ``where`` (a package's ``__init__.py``, a module
    file, or a namespace package's folder)."""
    found = where.parent if where.name == "__init__.py" else where
    kind, shown = ("folder", f"{found.name}/") if found.is_dir() else ("file", found.name)
    if found.resolve().parent == Path.cwd().resolve():
        return f"the {kind} {shown} in the working directory shadows it; run from another directory or rename that {kind}"
    others = foreign_distributions()
    if others:
        name = others[0]
        reinstall = f"pip install --force-reinstall {DISTRIBUTION}"
        return f"the distribution {name!r} installed it; run `pip uninstall {name}`, then `{reinstall}`"
    return f"{found.parent} comes first on the module search path (PYTHONPATH?); take it off there or rename its {shown}"


def foreign_distributions() -> list[str]:
    """Installed distributions other than ours that provide a top-level ``stages``."""
    from importlib.metadata import packages_distributions

    return sorted({d for d in packages_distributions().get(BUNDLED, []) if d.replace("_", "-").lower() != DISTRIBUTION})
