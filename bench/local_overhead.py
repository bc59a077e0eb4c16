"""Local execution overhead: ~1,000 trivial jobs end to end on our local executor vs Snakemake
running the same DAG (``--cores 2 --scheduler greedy``), in one run; then where our time goes.

The DAG is the benchmark study (benchstages: prep -> point -> gather, see common.py); every job
writes one tiny file. Ours: ``python -m orchestrator submit`` with ``max_parallel: 2``: every job is
a process forked from a forkserver that preloaded the engine, running what ``python -m orchestrator
run-job`` runs (resolve inputs by lineage, run the stage, commit its output as an artifact version
with provenance). Snakemake, two ways:

- ``shell:`` rules: each job is one ``bash -c`` one-liner (the cheapest job Snakemake can run);
- ``run:`` rules: each job is Python code, which Snakemake 9 runs as one ``python -m snakemake``
  subprocess per job (the equivalent of our Python stages). That costs ~1.5 s a job here, so it runs
  on a 21-job DAG (ours and ``shell:`` run on it too, for a same-size comparison).

Besides wall time, each run's CPU time is summed over all its processes (this process adopts
orphans, so the forkserver counts too): on a machine shared with other work, CPU per job decides
the ratio once the CPUs are busy.

Target (issue 8): faster than Snakemake.

    python bench/local_overhead.py           # 21-job and 1,000-job DAGs (about 3 minutes)
    python bench/local_overhead.py --quick   # 21-job and 100-job DAGs
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

from common import PYTHON, header, n_jobs, run, snakefile, study_yaml, table, tool, verdict

SMALL = (2, 3, 3)  # 2 + 18 + 1 = 21 jobs
SIZES = {"full": (27, 6, 6), "quick": (9, 2, 5)}  # 1,000 and 100 jobs
PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Become the parent of our descendants' orphans (the forkserver outlives its submit by a
    moment), so that their CPU time is counted in RUSAGE_CHILDREN. Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    return False


def reap_orphans() -> None:
    """Wait for every adopted orphan to exit, which adds its CPU time to RUSAGE_CHILDREN."""
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-1, 0)


def timed_run(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of every process it started, stdout) of one command."""
    reap_orphans()  # those of earlier commands count for those
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = run(cmd, cwd=cwd).stdout
    seconds = time.perf_counter() - t0
    reap_orphans()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, cpu, out


def ours(tmp: Path, dims: tuple[int, int, int]) -> tuple[float, float, Path]:
    work = tmp / f"ours-{n_jobs(*dims)}"
    work.mkdir()
    spec = work / "spec.yaml"
    spec.write_text(study_yaml("overhead", *dims, root=work / "store", max_parallel=2))
    seconds, cpu, out = timed_run([PYTHON, "-m", "orchestrator", "submit", str(spec)], work)
    assert f"{n_jobs(*dims)} succeeded" in out, out[-2000:]
    return seconds, cpu, spec


def snakemake(tmp: Path, dims: tuple[int, int, int], shell: bool) -> tuple[float, float]:
    work = tmp / f"smk-{'shell' if shell else 'run'}-{n_jobs(*dims)}"
    work.mkdir()
    (work / "Snakefile").write_text(snakefile(*dims, shell=shell))
    cmd = [tool("snakemake"), "--cores", "2", "--scheduler", "greedy", "--quiet", "-s", str(work / "Snakefile"), "-d", str(work)]
    seconds, cpu, _ = timed_run(cmd, work)
    lines = (work / "out" / "summary.txt").read_text().splitlines()
    assert len(lines) == dims[0] * dims[1] * dims[2], len(lines)
    return seconds, cpu


# A fresh ``python -c`` process measures the job-level costs: a forkserver started from this
# script would re-run the script (its __main__) in every job process it forks.
PROBE = r"""
import importlib, io, json, os, sys, time
from contextlib import redirect_stdout
from pathlib import Path
from orchestrator.runner import run_job_command
from orchestrator.executors import LocalExecutor, local
from orchestrator.paths import StudyPaths
from orchestrator.plan import build_plan
from orchestrator.records import write_state
from orchestrator import runner
from orchestrator.spec import load_study

spec, root, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
study, registry = load_study(spec, [f"storage.root={root}"])
plan = build_plan(study, registry)
paths = StudyPaths(root, study.name)
ex = LocalExecutor(paths, runner.open_store(root), echo=lambda s: None)
out = {}

t = time.perf_counter()
todo, _ = ex.prepare(plan, spec, force=False)
for key in todo:
    write_state(paths, key, "succeeded", exit_code=0, executor="local")
out["bookkeeping"] = (time.perf_counter() - t) / len(todo)  # prepare (record, pending) + final state

ctx = local._context()
def started(n, target, *args):  # mean start .. reaped of a job process running target(*args)
    t = time.perf_counter()
    for _ in range(n):
        p = ctx.Process(target=target, args=args); p.start(); p.join()
    return (time.perf_counter() - t) / n
started(3, os.getpid)  # starts the forkserver
pairs = [(started(1, os.getpid), started(1, importlib.import_module, study.stage_package)) for _ in range(n)]
out["noop"] = sum(a for a, _ in pairs) / n
out["stage_import"] = sum(b - a for a, b in pairs) / n  # the forkserver never imports it

def alone(keys):  # the executor's way, one at a time: fork, running state, run-job, exit, reap
    t = time.perf_counter()
    for key in keys:
        p = ex._launch(key, False, 1)
        write_state(paths, key, "running", executor="local", external_id=str(p.pid))
        p.join()
        if p.exitcode != 0: raise SystemExit(f"job {key} failed: {paths.job(key).log.read_text()}")
    return (time.perf_counter() - t) / len(keys)
alone(todo[:1])
out["alone"] = alone(todo[1:n + 1])  # prep jobs first, then points that read them: plan order

code = runner.code_provenance()  # handed to each job, as the executor does
commit, times = runner.commit_outputs, []
def timed_commit(*a, **k):
    t = time.perf_counter(); refs = commit(*a, **k); times.append(time.perf_counter() - t); return refs
runner.commit_outputs = timed_commit
body = []
for key in todo[n + 1: 2 * n + 2]:
    with redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        if run_job_command(paths.job(key).record, code=code) != 0: raise SystemExit(f"job {key} failed")
        body.append(time.perf_counter() - t)
out["body"], out["commit"] = sum(body[1:]) / n, sum(times[1:]) / n

t = time.perf_counter()
for _ in range(10):
    runner.code_provenance()
out["provenance"] = (time.perf_counter() - t) / 10
print(json.dumps(out))
"""


def ours_preloaded(spec: Path) -> tuple[float, float]:
    """The same CLI submit (fresh store) in a process whose forkserver also preloads the stage
    package, so that no job imports it: a simulation of an engine change that is not made (see
    orchestrator.executors.local._context for why)."""
    shutil.rmtree(spec.parent / "store")
    code = (
        "import sys; import orchestrator.executors.local as L; "
        "L.FORKSERVER_PRELOAD = (*L.FORKSERVER_PRELOAD, 'benchstages'); "
        "from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    seconds, cpu, out = timed_run([PYTHON, "-c", code, "submit", str(spec)], spec.parent)
    assert "succeeded" in out and "failed" not in out, out[-2000:]
    return seconds, cpu


def overhead(spec: Path, total_s: float, cpu_s: float, jobs: int) -> tuple[list[list[object]], list[tuple[str, float]]]:
    """Per-job costs, each measured on its own after the run, on a fresh copy of the plan."""
    probe = json.loads(run([PYTHON, "-c", PROBE, str(spec), str(spec.parent / "fresh"), "40"], cwd=spec.parent).stdout)
    records = sorted((spec.parent / "store" / "studies" / "overhead" / "jobs").glob("*/job.json"))
    record = next(r for r in records if '"stage": "point"' in r.read_text())  # a typical job: one input
    slot = total_s / jobs * 2
    cmd = [PYTHON, "-m", "orchestrator", "run-job", "--force", str(record)]
    startup = min(_wall([PYTHON, "-c", "pass"]) for _ in range(5))
    process = min(_wall(cmd) for _ in range(5))
    imports, top = _imports(run([PYTHON, "-X", "importtime", *cmd[1:]], cwd=spec.parent).stderr)
    rest = slot - probe["alone"] - probe["bookkeeping"]
    rows = [
        ["wall time per job (whole submit / jobs)", total_s / jobs * 1e3],
        ["CPU time per job, all processes (submit, forkserver, jobs, git)", cpu_s / jobs * 1e3],
        ["time per job in one of the 2 slots", slot * 1e3],
        ["  one job alone, started as the executor does (fork .. reaped), fresh jobs", probe["alone"] * 1e3],
        ["    no-op job: fork from the preloaded forkserver, exit, reaped", probe["noop"] * 1e3],
        ["    importing the stage package in the job (the forkserver never does)", probe["stage_import"] * 1e3],
        ["    run-job body in-process (resolve, stage, commit), imports done", probe["body"] * 1e3],
        ["      of which committing the output (store.log + record_job, fsyncs)", probe["commit"] * 1e3],
        ["  submit process: job record, pending + final state", probe["bookkeeping"] * 1e3],
        ["  rest: waiting for the other slot's job / a CPU (2 slots share 2 CPUs)", rest * 1e3],
        ["code_provenance() (git x2, 8 packages): once a second in the submitter", probe["provenance"] * 1e3],
        ["for reference, a job as a fresh process (python -m orchestrator run-job):", process * 1e3],
        ["  interpreter start (python -c pass)", startup * 1e3],
        ["  imports (top-level modules, -X importtime)", imports * 1e3],
    ]
    return rows, top


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t0


def _imports(text: str) -> tuple[float, list[tuple[str, float]]]:
    """Total import time (top-level modules' cumulative times) and the heaviest imports three levels deep."""
    total, rows = 0.0, []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        depth = (len(m[3]) - 1) // 2
        if depth == 0:
            total += int(m[2]) / 1e6
        if depth <= 2 and int(m[2]) >= 5000:
            rows.append(("  " * depth + m[4], int(m[2]) / 1e6))
    return total, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 jobs instead of 1,000 for the large DAG")
    args = ap.parse_args()
    header("local execution overhead: orchestrator submit vs snakemake, same DAG of trivial jobs")
    dims = SIZES["quick" if args.quick else "full"]
    adopted = adopt_orphans()
    tmp = Path(tempfile.mkdtemp(prefix="bench-local-"))
    try:
        n_small, n_big = n_jobs(*SMALL), n_jobs(*dims)
        o_small, o_small_cpu, _ = ours(tmp, SMALL)
        s_run, s_run_cpu = snakemake(tmp, SMALL, shell=False)
        s_shell_small, s_shell_small_cpu = snakemake(tmp, SMALL, shell=True)
        o_big, o_big_cpu, spec = ours(tmp, dims)
        s_shell, s_shell_cpu = snakemake(tmp, dims, shell=True)
        detail, top = overhead(spec, o_big, o_big_cpu, n_big)
        o_pre, o_pre_cpu = ours_preloaded(spec)

        def row(n: int, method: str, seconds: float, cpu: float | None, ours_s: float) -> list[object]:
            cpu_ms = "-" if cpu is None else cpu / n * 1e3
            return [n, method, seconds, seconds / n * 1e3, cpu_ms, seconds / ours_s]

        rows = [
            row(n_small, "ours (python -m orchestrator submit)", o_small, o_small_cpu, o_small),
            row(n_small, "snakemake, run: rules (python subprocess per job)", s_run, s_run_cpu, o_small),
            row(n_small, "snakemake, shell: rules", s_shell_small, s_shell_small_cpu, o_small),
            row(n_big, "ours (python -m orchestrator submit)", o_big, o_big_cpu, o_big),
            row(n_big, "ours, simulated: forkserver also preloads the stage package", o_pre, o_pre_cpu, o_big),
            row(n_big, "snakemake, shell: rules", s_shell, s_shell_cpu, o_big),
            row(n_big, "snakemake, run: rules (estimated from the 21-job DAG)", s_run / n_small * n_big, None, o_big),
        ]
        cpu_note = "" if adopted else " (no PR_SET_CHILD_SUBREAPER here: orphans' CPU is missing)"
        print(table(["jobs", "method (2 at a time)", "seconds", "ms/job", "CPU ms/job", "time / ours (>1: ours faster)"], rows))
        print(f"\nwhere our time goes ({n_big}-job run), ms{cpu_note}:")
        print(table(["cost", "ms"], detail))
        print("\nheaviest imports of one run-job process (ms, cumulative, >= 5 ms, 3 levels):")
        print(table(["module", "ms"], [[m, t * 1e3] for m, t in top]))
        print(
            f"\ntarget: faster than snakemake: vs run: rules {s_run / o_small:.1f}x -> {verdict(s_run > o_small)}; "
            f"vs shell: rules {s_shell / o_big:.2f}x at {n_big} jobs -> {verdict(s_shell > o_big)} "
            f"(simulated stage preload: {s_shell / o_pre:.2f}x; CPU per job: snakemake shell "
            f"{s_shell_cpu / n_big * 1e3:.1f} ms, ours {o_big_cpu / n_big * 1e3:.1f} ms)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
