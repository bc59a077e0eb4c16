"""The files shipped besides the modules: the example specs, the sbatch template, W&B's sweep schema.

The one place that finds them. Installed from a wheel or sdist they sit inside the package and are
found with ``importlib.resources``: ``orchestrator/examples/*.yaml`` and
``orchestrator/templates/default.sbatch`` (pyproject.toml maps the checkout's top-level ``specs/`` and
``slurm_templates/`` there) and ``orchestrator/wandb_sweep_schema.json``. Run from a checkout
(``python -m orchestrator`` in it, or the editable install of ``scripts/setup.sh``) the package has
no such folders, and the checkout's own are used.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# package folder (installed) -> the checkout's top-level folder it is built from (pyproject.toml's package-dir)
EXAMPLES, TEMPLATES = "examples", "templates"
CHECKOUT_FOLDERS = {EXAMPLES: "specs", TEMPLATES: "slurm_templates"}
EXAMPLE_SPECS = ("demo.yaml", "full_study.yaml", "threshold_sweep.yaml")
TEMPLATE_NAME = "default.sbatch"
SCHEMA_NAME = "wandb_sweep_schema.json"


def package_dir() -> Path:
    """The orchestrator package's folder (as importlib.resources sees it)."""
    root = files("orchestrator")
    return root if isinstance(root, Path) else Path(str(root))


def locate(folder: str, name: str) -> Path:
    """File ``name`` of the packaged ``folder`` (EXAMPLES or TEMPLATES): inside the installed package,
    else in the checkout's top-level folder; where it should be installed if it is in neither (reading
    it then fails naming that path)."""
    installed = package_dir() / folder / name
    if installed.is_file():
        return installed
    checkout = package_dir().parent / CHECKOUT_FOLDERS[folder] / name
    return checkout if checkout.is_file() else installed


def example_specs() -> dict[str, Path]:
    """The example specs by file name: demo.yaml (offline, tiny), full_study.yaml, threshold_sweep.yaml."""
    return {name: locate(EXAMPLES, name) for name in EXAMPLE_SPECS}


def slurm_template() -> Path:
    """The default sbatch template (``slurm_templates/default.sbatch`` in a checkout)."""
    return locate(TEMPLATES, TEMPLATE_NAME)


def sweep_schema() -> Path:
    """W&B's sweep-config JSON schema (``orchestrator/wandb_sweep_schema.json`` in both layouts)."""
    return package_dir() / SCHEMA_NAME
