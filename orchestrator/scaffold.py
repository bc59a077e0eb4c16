"""``orchestrator init [DIR]``: the example specs and a copy of the sbatch template, to start from.

Writes demo.yaml, full_study.yaml, threshold_sweep.yaml and default.sbatch (from the installed
package, or the checkout's specs/ and slurm_templates/) into a folder, never over an existing file
unless asked (``--force``), each file whole or not at all; then says what to run next.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import console
from orchestrator.errors import BadArgument, OrchestratorError
from orchestrator.packaged import TEMPLATE_NAME, example_specs, slurm_template


@dataclass
class InitReport:
    """What ``init`` did: the files it wrote and those it left as they were."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def starter_files() -> dict[str, str]:
    """File name -> text of every file ``init`` writes, all read before anything is written."""
    sources = {**example_specs(), TEMPLATE_NAME: slurm_template()}
    texts = {}
    for name, path in sources.items():
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise OrchestratorError(f"the installed package has no {path}; reinstall cross-lingual-subnets") from None
    return texts


def init_folder(folder: Path, *, force: bool = False) -> InitReport:
    """Write the starter files into ``folder`` (created if missing); an existing file is skipped unless ``force``."""
    if folder.exists() and not folder.is_dir():
        raise BadArgument(f"{folder} is a file; name a folder for the example specs (init DIR)")
    texts = starter_files()
    folder.mkdir(parents=True, exist_ok=True)
    report = InitReport()
    for name, text in texts.items():
        target = folder / name
        if target.is_dir():
            raise BadArgument(f"{target} is a folder; move it away or init another folder")
        if target.exists() and not force:
            report.skipped.append(target)
            continue
        write_whole(target, text)
        report.written.append(target)
    return report


def write_whole(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file and a rename (the file's mode follows the
    umask, as any file the user creates)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def next_steps(folder: Path, prog: str) -> list[str]:
    """The commands to run after ``init`` into ``folder``, run as ``prog``."""
    here = folder.resolve() == Path.cwd().resolve()
    template = shlex.quote(str((folder / TEMPLATE_NAME).resolve()))
    steps = [] if here else [(f"cd {shlex.quote(str(folder))}", "")]
    steps += [
        (f"{prog} validate demo.yaml", "check a spec; nothing runs"),
        (f"{prog} submit demo.yaml", "the offline demo (needs the ml and plots extras)"),
        (f"{prog} plots demo", "where its figures and report are"),
        (f"{prog} sweep threshold_sweep.yaml", "a pruning-threshold sweep of the demo"),
        (f"{prog} submit full_study.yaml --dry-run", "the real study on SLURM: its batch scripts, nothing queued"),
    ]
    width = max(len(cmd) for cmd, _ in steps)
    lines = ["next:"] + [f"  {cmd:<{width}}  # {why}" if why else f"  {cmd}" for cmd, why in steps]
    lines.append(f"your own sbatch template: edit {TEMPLATE_NAME}, then set executor.slurm.template={template}")
    return lines


def run_init(folder: Path, *, force: bool, prog: str) -> int:
    """``init``: write the starter files, say which were skipped (stderr) and what to run next."""
    report = init_folder(folder, force=force)
    for path in report.written:
        print(f"wrote {path}")
    for path in report.skipped:
        print(f"skipped {path}: it exists (--force overwrites it)", file=sys.stderr)
    if not console.quiet():
        print("\n".join(next_steps(folder, prog)))
    return 0
