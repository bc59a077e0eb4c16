"""Helpers shared by the benchmark scripts: timing, tables, a stage context, the benchmark study and
its Snakefile."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


@dataclass
class BenchContext:
    """A StageContext (protocol of ``orchestrator.stage``) on a directory, for running a stage function
    in-process: metrics are kept (``metrics``), nothing is tracked, and ``step_end`` records when each
    ``progress`` update came (a step's end, for a stage that reports steps)."""

    root: Path
    provenance: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 1234
    job_label: str = "bench"
    stop_requested: threading.Event = field(default_factory=threading.Event)
    gpus: int = 0
    rank: int = 0
    world_size: int = 1
    step_end: dict[int, float] = field(default_factory=dict)
    metrics: list[tuple[dict[str, float], int | None]] = field(default_factory=list)
    checkpoint_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.checkpoint_dir = self.root / "checkpoint"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    def output_dir(self, name: str) -> Path:
        path = self.root / "outputs" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def progress(self, done: int, total: int | None = None, unit: str = "step") -> None:
        self.step_end[done] = time.perf_counter()


def env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: the project and bench/ importable, offline."""
    parts = [str(BENCH), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in parts if p),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **extra,
    }


def tool(name: str) -> str:
    """A console script of this interpreter's environment (snakemake, ...)."""
    path = Path(PYTHON).parent / name
    return str(path) if path.exists() else name


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(n: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Minimum wall time over ``n`` runs (and the last result)."""
    times, out = [], None
    for _ in range(n):
        t, out = timed(fn)
        times.append(t)
    return min(times), out


def median_of(n: int, fn: Callable[[], Any]) -> float:
    return statistics.median(timed(fn)[0] for _ in range(n))


def run(cmd: Sequence[str], *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("env", env())
    result = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise SystemExit(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def machine() -> str:
    cpus = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return f"{platform.node()} | {platform.machine()} | {cpus} CPUs | {mem:.0f} GiB | Python {platform.python_version()}"


def header(title: str) -> None:
    print(f"# {title}\n# {time.strftime('%Y-%m-%d %H:%M:%S')} | {machine()}\n")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# ----------------------------------------------------------------------- the benchmark study
def study_yaml(name: str, languages: int, thresholds: int, seeds: int, *, root: Path, max_parallel: int = 2) -> str:
    """prep (per language) -> point (languages x thresholds x seeds) -> gather (all points)."""
    langs = ", ".join(f"l{i:02d}" for i in range(languages))
    thr = ", ".join(f"{1 + i / 100:.2f}" for i in range(thresholds))
    sds = ", ".join(str(i + 1) for i in range(seeds))
    return f"""\
name: {name}
languages: [{langs}]
stage_package: benchstages
executor: {{backend: local, local: {{max_parallel: {max_parallel}}}}}
storage: {{root: {root}}}
stages:
  prep:
    matrix: {{language: "${{languages}}"}}
  point:
    matrix: {{language: "${{languages}}", threshold: [{thr}], seed: [{sds}]}}
    inputs: {{data: prep}}
  gather:
    inputs: {{results: point}}
"""


def n_jobs(languages: int, thresholds: int, seeds: int) -> int:
    return languages + languages * thresholds * seeds + 1


def snakefile(languages: int, thresholds: int, seeds: int, *, shell: bool = False) -> str:
    """The same DAG as ``study_yaml`` for Snakemake: 3 rules (+ ``all``), same wildcards, same count.

    ``shell=False`` uses ``run:`` blocks (Python in the Snakemake process, like our in-process
    stages would be); ``shell=True`` runs each job as a shell command, one process per job."""
    langs = [f"l{i:02d}" for i in range(languages)]
    thr = [f"{1 + i / 100:.2f}" for i in range(thresholds)]
    sds = [str(i + 1) for i in range(seeds)]
    if shell:
        bodies = {
            "prep": 'shell: "printf %s {wildcards.lang} > {output}"',
            "point": "shell: \"cat {input} > {output} && echo ' {wildcards.thr} {wildcards.seed}' >> {output}\"",
            "gather": 'shell: "cat {input} > {output}"',
        }
    else:
        bodies = {
            "prep": "run:\n        Path(output[0]).write_text(wildcards.lang)",
            "point": "run:\n        Path(output[0]).write_text("
            "Path(input[0]).read_text() + f' {wildcards.thr} {wildcards.seed}\\n')",
            "gather": "run:\n        Path(output[0]).write_text(''.join(Path(p).read_text() for p in input))",
        }
    return f"""\
from pathlib import Path
LANGS = {langs!r}
THRS = {thr!r}
SEEDS = {sds!r}

rule all:
    input: "out/summary.txt"

rule prep:
    output: "out/prep/{{lang}}.txt"
    {bodies["prep"]}

rule point:
    input: "out/prep/{{lang}}.txt"
    output: "out/point/{{lang}}/{{thr}}/{{seed}}.txt"
    {bodies["point"]}

rule gather:
    input: expand("out/point/{{lang}}/{{thr}}/{{seed}}.txt", lang=LANGS, thr=THRS, seed=SEEDS)
    output: "out/summary.txt"
    {bodies["gather"]}
"""
