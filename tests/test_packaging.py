"""What the package ships and how it starts: the packaged files (orchestrator.packaged), pyproject's
package list, ``init``, ``--version`` and the program's name, and the guard against a ``stages``
package that is not ours (a folder in the working directory, one on PYTHONPATH, another distribution's).
The installed wheel itself is tests/test_wheel.py's."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import ROOT, cli

from orchestrator import packaged, program
from orchestrator.cli import main
from orchestrator.stage import load_registry
from orchestrator.stage_origin import MARKER, check_origin


def first_on_path(folder: Path) -> str:
    """PYTHONPATH with ``folder`` before the checkout (conftest puts the checkout there)."""
    return f"{folder}{os.pathsep}{os.environ['PYTHONPATH']}"


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_package_and_maps_the_top_level_folders_packaged_reads() -> None:
    """The package list is explicit (two packages are mapped folders): a new subpackage missing from it
    would be missing from the wheel."""
    config = setuptools_config()
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("orchestrator", "stages")
        for init in (ROOT / top).rglob("__init__.py")
    }
    mapped = {f"orchestrator.{folder}": checkout for folder, checkout in packaged.CHECKOUT_FOLDERS.items()}
    assert config["package-dir"] == mapped
    assert sorted(config["packages"]) == sorted(on_disk | set(mapped))
    data = config["package-data"]
    assert packaged.SCHEMA_NAME in data["orchestrator"]
    assert data[f"orchestrator.{packaged.EXAMPLES}"] == ["*.yaml"] and data[f"orchestrator.{packaged.TEMPLATES}"] == ["*.sbatch"]
    assert sorted(p.name for p in (ROOT / "specs").glob("*.yaml")) == sorted(packaged.EXAMPLE_SPECS)


def test_from_the_checkout_packaged_finds_the_top_level_folders() -> None:
    assert packaged.example_specs() == {name: ROOT / "specs" / name for name in packaged.EXAMPLE_SPECS}
    assert packaged.slurm_template() == ROOT / "slurm_templates" / "default.sbatch"
    assert packaged.sweep_schema() == ROOT / "orchestrator" / "wandb_sweep_schema.json"
    assert all(p.is_file() for p in [*packaged.example_specs().values(), packaged.slurm_template(), packaged.sweep_schema()])


def test_init_writes_the_examples_and_the_template_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    out = capsys.readouterr().out
    names = [*packaged.EXAMPLE_SPECS, packaged.TEMPLATE_NAME]
    for name in names:
        assert f"wrote {name}\n" in out
        source = packaged.slurm_template() if name == packaged.TEMPLATE_NAME else ROOT / "specs" / name
        assert (tmp_path / name).read_text() == source.read_text()
    assert "orchestrator validate demo.yaml" in out and "orchestrator plots demo" in out and "cd " not in out
    assert f"then set executor.slurm.template={tmp_path / 'default.sbatch'}" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left

    (tmp_path / "demo.yaml").write_text("mine\n")
    assert main(["-q", "init"]) == 0
    run = capsys.readouterr()
    assert run.out == ""  # -q: nothing written, no next steps
    assert run.err.splitlines() == [f"skipped {name}: it exists (--force overwrites it)" for name in names]
    assert (tmp_path / "demo.yaml").read_text() == "mine\n"

    assert main(["init", "--force"]) == 0
    assert (tmp_path / "demo.yaml").read_text() == (ROOT / "specs" / "demo.yaml").read_text()


def test_init_into_a_new_folder_says_cd_and_a_file_in_the_way_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "my study"]) == 0
    out = capsys.readouterr().out
    assert "wrote my study/demo.yaml" in out and "  cd 'my study'\n" in out
    assert (tmp_path / "my study" / "threshold_sweep.yaml").is_file()

    (tmp_path / "taken").write_text("")
    assert main(["init", "taken"]) == 2
    err = capsys.readouterr().err
    assert err == "error: taken is a file; name a folder for the example specs (init DIR)\n"


def test_version_and_the_program_name_as_typed(tmp_path: Path) -> None:
    run = cli("--version", cwd=tmp_path)
    assert run.returncode == 0 and run.stdout == f"orchestrator {version('cross-lingual-subnets')}\n"
    assert cli("--help", cwd=tmp_path).stdout.startswith("usage: python -m orchestrator [-h] [--version]")
    assert cli("init", "--help", cwd=tmp_path).stdout.startswith("usage: python -m orchestrator init [-h]")
    assert program.name("/venv/bin/orchestrator") == "orchestrator"
    assert program.name(str(ROOT / "orchestrator" / "__main__.py")) == "python -m orchestrator"


@pytest.mark.parametrize(
    ("path", "kind", "shown"), [("stages/__init__.py", "folder", "stages/"), ("stages.py", "file", "stages.py")]
)
def test_a_stages_folder_or_module_in_the_working_directory_is_named_in_one_line(
    tmp_path: Path, path: str, kind: str, shown: str
) -> None:
    """python -m puts the working directory first on sys.path: its stages/ (or stages.py) would shadow ours."""
    (tmp_path / path).parent.mkdir(exist_ok=True)
    (tmp_path / path).write_text("def registry():\n    return None\n")
    run = cli("validate", str(ROOT / "specs" / "demo.yaml"), cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr == (
        f"error: stage package 'stages' was imported from {tmp_path / path}, which is not this project's stages package: "
        f"the {kind} {shown} in the working directory shadows it; run from another directory or rename that {kind}\n"
    )


def test_a_foreign_stages_on_pythonpath_is_named_in_one_line(tmp_path: Path) -> None:
    elsewhere = tmp_path / "libs"
    (elsewhere / "stages").mkdir(parents=True)
    (elsewhere / "stages" / "__init__.py").write_text('"""Someone else\'s stages."""\n')
    work = tmp_path / "work"
    work.mkdir()
    run = cli("validate", str(ROOT / "specs" / "demo.yaml"), cwd=work, env={"PYTHONPATH": first_on_path(elsewhere)})
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and f"imported from {elsewhere / 'stages' / '__init__.py'}" in run.stderr
    assert (
        f"{elsewhere} comes first on the module search path (PYTHONPATH?); take it off there or rename its stages/" in run.stderr
    )


def test_another_distributions_stages_is_named_with_what_to_uninstall(tmp_path: Path) -> None:
    """A real distribution named ``stages`` (as PyPI's unrelated one), installed by pip into a folder."""
    project = tmp_path / "project"
    (project / "stages").mkdir(parents=True)
    (project / "stages" / "__init__.py").write_text("def run():\n    pass\n")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "stages"\nversion = "1.0"\n[tool.setuptools]\npackages = ["stages"]\n'
    )
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site)]
    subprocess.run([*pip, str(project)], check=True, capture_output=True, timeout=300)
    run = cli("validate", str(ROOT / "specs" / "demo.yaml"), cwd=tmp_path, env={"PYTHONPATH": first_on_path(site)})
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert f"imported from {site / 'stages' / '__init__.py'}" in run.stderr
    uninstall = "the distribution 'stages' installed it; run `pip uninstall stages`, then `pip install --force-reinstall cross-lingual-subnets`"
    assert uninstall in run.stderr


def test_our_stages_carries_the_marker_and_other_stage_packages_are_not_checked() -> None:
    ours = importlib.import_module("stages")
    assert getattr(ours, MARKER) is True
    check_origin("stages", ours)  # no error
    assert "emit" in load_registry("toystages")  # a user's own package needs no marker
