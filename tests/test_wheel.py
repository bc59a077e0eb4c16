"""The package as a new user gets it: an sdist built from the checkout, a wheel built from that sdist
(what ``python -m build`` does), installed into a fresh venv and run from an empty folder outside the
checkout: ``--version``, ``init``, ``validate`` of the sweep spec, a SLURM dry run with no SLURM
command on PATH, the demo (shrunk by ``--set``) and its ``plots``.

No network here: the wheel is installed with ``--no-deps``, and the new venv sees the project venv's
installed dependencies through a .pth file. A path added by a .pth file gets no .pth processing of its
own, so the project venv's editable install of this checkout stays invisible; a test checks that
``orchestrator`` and ``stages`` are imported from the wheel's copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DATA = ("orchestrator/wandb_sweep_schema.json",)
SPECS = ("demo.yaml", "full_study.yaml", "threshold_sweep.yaml")
TEMPLATE = "default.sbatch"

# the demo in a minute: 2 languages, a tiny model, a few steps; every stage still runs
SMALL_DEMO = [
    "languages=[en,es]",
    "stages.corpus_base.params.max_docs_per_language=30",
    "stages.corpus.params.max_docs_per_language=30",
    "stages.tokenizer.params.vocab_size=300",
    "stages.tokenize_base.params.block_size=32",
    "stages.tokenize.params.block_size=32",
    "stages.tokenize_base.params.max_chunks_per_language=40",
    "stages.tokenize.params.max_chunks_per_language=40",
    "stages.tokenize_base.params.max_test_chunks_per_language=8",
    "stages.tokenize.params.max_test_chunks_per_language=8",
    "model.config={hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 32}",
    "stages.pretrain.params.epochs=1",
    "stages.pretrain.params.eval_every=20",
    "stages.train.params.max_steps=4",
    "stages.train.params.warmup_steps=0",
    "stages.train.params.eval_every=2",
    "stages.parallel.params.n_sentences=30",
    "stages.similarity.params.isomorphism_max_sentences=15",
]


@dataclass(frozen=True)
class Built:
    sdist_names: list[str]
    wheel_names: list[str]
    venv: Path

    def env(self) -> dict[str, str]:
        """The user's environment with only the venv's bin/ on PATH (no SLURM commands, no git) and
        nothing of the checkout on PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return {**env, "PATH": str(self.venv / "bin")}

    def run(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``args[0]`` from the venv's bin/ (the console script, or its python)."""
        command = [str(self.venv / "bin" / args[0]), *args[1:]]
        return subprocess.run(command, cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout)


def checkout_files() -> list[str]:
    """The checkout as git sees it: tracked and new files, without what .gitignore ignores."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [name for name in listed.stdout.split("\0") if name and (ROOT / name).is_file()]


def build(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """sdist (from a copy of the checkout, so the build leaves nothing in it) -> wheel -> fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in checkout_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    sdist = dist / build([sys.executable, "-c", code, str(dist)], src).strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        sdist_names = [name.split("/", 1)[1] for name in tar.getnames() if "/" in name]
        tar.extractall(tmp / "unpacked", filter="data")
    unpacked = next((tmp / "unpacked").iterdir())
    pip = [sys.executable, "-m", "pip"]
    build([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(unpacked)], tmp)
    wheel = next(dist.glob("*.whl"))
    venv = tmp / "venv"
    build([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "project-venv-deps.pth").write_text("".join(f"{path}\n" for path in sorted(deps)))
    build([*pip, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp)
    return Built(sdist_names, zipfile.ZipFile(wheel).namelist(), venv)


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    """An empty folder outside the checkout."""
    work = tmp_path / "work"
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)
    return work


def test_the_sdist_and_the_wheel_carry_the_specs_the_template_and_the_schema(built: Built) -> None:
    assert {*DATA, "slurm_templates/" + TEMPLATE, *(f"specs/{s}" for s in SPECS)} <= set(built.sdist_names)
    assert {*DATA, "orchestrator/templates/" + TEMPLATE, *(f"orchestrator/examples/{s}" for s in SPECS)} <= set(built.wheel_names)
    stray = [name for name in built.wheel_names if name.startswith(("specs/", "slurm_templates/", "tests/"))]
    assert stray == []  # the folders are inside the orchestrator package, not top-level packages


def test_the_venv_imports_the_wheels_copy_not_the_checkout(built: Built, empty: Path) -> None:
    code = (
        "import importlib.metadata as m, orchestrator, stages; "
        "print(orchestrator.__file__); print(stages.__file__); print(m.distribution('cross-lingual-subnets').locate_file(''))"
    )
    run = built.run("python", "-c", code, cwd=empty)
    assert run.returncode == 0, run.stderr
    site = next((built.venv / "lib").glob("python3*/site-packages"))
    assert [Path(line) for line in run.stdout.splitlines()] == [
        site / "orchestrator" / "__init__.py", site / "stages" / "__init__.py", site
    ]  # fmt: skip


def test_version_init_validate_and_a_slurm_dry_run_from_an_empty_folder(built: Built, empty: Path) -> None:
    version = built.run("orchestrator", "--version", cwd=empty)
    assert (version.returncode, version.stdout) == (0, f"orchestrator {VERSION}\n")

    init = built.run("orchestrator", "init", cwd=empty)
    assert init.returncode == 0, init.stderr
    assert "orchestrator validate demo.yaml" in init.stdout
    for name in SPECS:
        assert (empty / name).read_text() == (ROOT / "specs" / name).read_text()
    assert (empty / TEMPLATE).read_text() == (ROOT / "slurm_templates" / TEMPLATE).read_text()

    sweep = built.run("orchestrator", "validate", "threshold_sweep.yaml", cwd=empty)
    assert sweep.returncode == 0, sweep.stderr
    assert "threshold_sweep.yaml: ok - study 'demo_threshold_sweep'" in sweep.stdout

    assert shutil.which("sbatch", path=built.env()["PATH"]) is None
    dry = built.run("orchestrator", "submit", "full_study.yaml", "--executor", "slurm", "--dry-run", "--store", "st", cwd=empty)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing submitted" in dry.stdout
    scripts = sorted((empty / "st" / "studies" / "full_study" / "slurm").glob("*/*.sbatch"))
    assert scripts and scripts[0].name == "000-corpus.sbatch"
    text = scripts[0].read_text()
    assert text.startswith("#!/bin/bash\n#SBATCH") and f"{built.venv}/bin/python -m orchestrator run-job --list" in text


def test_the_demo_runs_and_plots_from_an_empty_folder(built: Built, empty: Path) -> None:
    assert built.run("orchestrator", "-q", "init", cwd=empty).returncode == 0
    sets = [arg for value in SMALL_DEMO for arg in ("--set", value)]
    demo = built.run("orchestrator", "submit", "demo.yaml", *sets, cwd=empty, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert re.search(r"^study demo: 0 cached, \d+ succeeded$", demo.stdout, re.M), demo.stdout
    assert (empty / ".orchestrator" / "artifacts").is_dir()

    plots = built.run("orchestrator", "plots", "demo", cwd=empty)
    assert plots.returncode == 0, plots.stderr
    page = empty / ".orchestrator" / "studies" / "demo" / "figures" / "demo.report.figures" / "report.html"
    assert str(page) in plots.stdout and page.is_file()
    assert len(list(page.parent.glob("*.png"))) > 5
