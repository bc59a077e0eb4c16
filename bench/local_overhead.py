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

Target (issue 8): faster than Snakemake.

    python bench/local_overhead.py           # 21-job and 1,000-job DAGs (about 3 minutes)
    python bench/local_overhead.py --quick   # 21-job and 100-job DAGs
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from common import PYTHON, env, header, n_jobs, run, snakefile, study_yaml, table, tool, verdict

SMALL = (2, 3, 3)  # 2 + 18 + 1 = 21 jobs
SIZES = {"full": (27, 6, 6), "quick": (9, 2, 5)}  # 1,000 and 100 jobs


def ours(tmp: Path, dims: tuple[int, int, int]) -> tuple[float, Path]:
    work = tmp / f"ours-{n_jobs(*dims)}"
    work.mkdir()
    spec = work / "spec.yaml"
    spec.write_text(study_yaml("overhead", *dims, root=work / "store", max_parallel=2))
    t0 = time.perf_counter()
    out = run([PYTHON, "-m", "orchestrator", "submit", str(spec)], cwd=work).stdout
    seconds = time.perf_counter() - t0
    assert f"{n_jobs(*dims)} succeeded" in out, out[-2000:]
    return seconds, spec


def snakemake(tmp: Path, dims: tuple[int, int, int], shell: bool) -> float:
    work = tmp / f"smk-{'shell' if shell else 'run'}-{n_jobs(*dims)}"
    work.mkdir()
    (work / "Snakefile").write_text(snakefile(*dims, shell=shell))
    t0 = time.perf_counter()
    run(
        [tool("snakemake"), "--cores", "2", "--scheduler", "greedy", "--quiet", "-s", str(work / "Snakefile"), "-d", str(work)],
        cwd=work,
    )
    seconds = time.perf_counter() - t0
    lines = (work / "out" / "summary.txt").read_text().splitlines()
    assert len(lines) == dims[0] * dims[1] * dims[2], len(lines)
    return seconds


def noop() -> None:
    pass


def overhead(spec: Path, total_s: float, jobs: int) -> tuple[list[list[object]], list[tuple[str, float]]]:
    """Per-job costs, each measured in isolation after the run (best of a few where it is noisy)."""
    from orchestrator.executors.local import POLL_S

    records = sorted((spec.parent / "store" / "studies" / "overhead" / "jobs").glob("*/job.json"))
    record = next(r for r in records if '"stage": "point"' in r.read_text())  # a typical job: one input
    fork = _fork_cost()
    body, provenance_s, bookkeeping = _fresh_jobs(spec)
    slot = total_s / jobs * 2
    cmd = [PYTHON, "-m", "orchestrator", "run-job", "--force", str(record)]
    startup = min(_wall([PYTHON, "-c", "pass"]) for _ in range(5))
    process = min(_wall(cmd) for _ in range(5))
    imports, top = _imports(run([PYTHON, "-X", "importtime", *cmd[1:]], cwd=spec.parent).stderr)
    rows = [
        ["wall time per job (whole submit / jobs)", total_s / jobs * 1e3],
        ["time per job in one of the 2 slots", slot * 1e3],
        ["  job process: fork from the preloaded forkserver, exit (no-op job)", fork * 1e3],
        ["  run-job body (record, resolve, stage, commit, job record), fresh jobs", body * 1e3],
        ["    of which provenance() (2 git subprocesses, 8 package versions)", provenance_s * 1e3],
        ["  submit process: job record + 3 states, each fsynced", bookkeeping * 1e3],
        [
            f"  rest: waiting for the {POLL_S * 1e3:.0f} ms poll to notice an exit, CPU contention",
            (slot - fork - body - bookkeeping) * 1e3,
        ],
        ["for reference, a job as a fresh process (python -m orchestrator run-job):", process * 1e3],
        ["  interpreter start (python -c pass)", startup * 1e3],
        ["  imports (top-level modules, -X importtime)", imports * 1e3],
    ]
    return rows, top


def _fork_cost() -> float:
    from orchestrator.executors.local import _context

    ctx = _context()
    first = ctx.Process(target=noop)
    first.start()  # starts the forkserver
    first.join()
    t0 = time.perf_counter()
    for _ in range(40):
        proc = ctx.Process(target=noop)
        proc.start()
        proc.join()
    return (time.perf_counter() - t0) / 40


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


def _fresh_jobs(spec: Path, n: int = 40) -> tuple[float, float, float]:
    """On a fresh copy of the plan: (mean run-job body in-process over ``n`` jobs, provenance() per
    job, the submit process's bookkeeping per job: prepare + the running and succeeded states)."""
    import contextlib
    import io
    import os

    from orchestrator.cli import main
    from orchestrator.executors import LocalExecutor
    from orchestrator.paths import StudyPaths
    from orchestrator.plan import build_plan
    from orchestrator.records import read_job_record, write_state
    from orchestrator.runner import open_store, provenance
    from orchestrator.spec import load_study

    os.environ.update({k: v for k, v in env().items() if k == "PYTHONPATH"})
    root = spec.parent / "fresh"
    study, registry = load_study(spec, [f"storage.root={root}"])
    plan = build_plan(study, registry)
    paths = StudyPaths(root, study.name)
    ex = LocalExecutor(paths, open_store(root), echo=lambda s: None)
    t0 = time.perf_counter()
    todo, _ = ex.prepare(plan, spec, force=False)
    for key in todo:
        write_state(paths, key, "running", executor="local", external_id="1")
        write_state(paths, key, "succeeded", exit_code=0, executor="local")
    bookkeeping = (time.perf_counter() - t0) / len(todo)
    times = []
    for key in todo[: n + 1]:  # prep jobs first, then points that read them: the plan's order
        with contextlib.redirect_stdout(io.StringIO()):
            t1 = time.perf_counter()
            assert main(["run-job", str(paths.job(key).record)]) == 0
            times.append(time.perf_counter() - t1)
    record = read_job_record(paths.job(todo[-2]).record)
    t2 = time.perf_counter()
    for _ in range(10):
        provenance(record)
    return sum(times[1:]) / n, (time.perf_counter() - t2) / 10, bookkeeping


def ours_fast_poll(spec: Path) -> float:
    """The same CLI submit in a process whose executor polls every 1 ms instead of 20 ms: what
    reaping a job the moment it exits would give (a simulation of an engine change)."""
    import shutil as _shutil

    _shutil.rmtree(spec.parent / "store")
    code = (
        "import sys; import orchestrator.executors.local as L; L.POLL_S = 0.001; "
        "from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    t0 = time.perf_counter()
    out = run([PYTHON, "-c", code, "submit", str(spec)], cwd=spec.parent).stdout
    seconds = time.perf_counter() - t0
    assert "succeeded" in out and "failed" not in out, out[-2000:]
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 jobs instead of 1,000 for the large DAG")
    args = ap.parse_args()
    header("local execution overhead: orchestrator submit vs snakemake, same DAG of trivial jobs")
    dims = SIZES["quick" if args.quick else "full"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-local-"))
    try:
        n_small, n_big = n_jobs(*SMALL), n_jobs(*dims)
        o_small, _ = ours(tmp, SMALL)
        s_run = snakemake(tmp, SMALL, shell=False)
        s_shell_small = snakemake(tmp, SMALL, shell=True)
        o_big, spec = ours(tmp, dims)
        s_shell = snakemake(tmp, dims, shell=True)
        detail, top = overhead(spec, o_big, n_big)
        o_fast = ours_fast_poll(spec)
        rows = [
            [n_small, "ours (python -m orchestrator submit)", o_small, o_small / n_small * 1e3, 1.0],
            [n_small, "snakemake, run: rules (python subprocess per job)", s_run, s_run / n_small * 1e3, s_run / o_small],
            [n_small, "snakemake, shell: rules", s_shell_small, s_shell_small / n_small * 1e3, s_shell_small / o_small],
            [n_big, "ours (python -m orchestrator submit)", o_big, o_big / n_big * 1e3, 1.0],
            [n_big, "ours, simulated: executor polls every 1 ms, not 20", o_fast, o_fast / n_big * 1e3, o_fast / o_big],
            [n_big, "snakemake, shell: rules", s_shell, s_shell / n_big * 1e3, s_shell / o_big],
            [
                n_big,
                "snakemake, run: rules (estimated from the 21-job DAG)",
                s_run / n_small * n_big,
                s_run / n_small * 1e3,
                s_run / n_small * n_big / o_big,
            ],
        ]
        print(table(["jobs", "method (2 at a time)", "seconds", "ms/job", "time / ours (>1: ours faster)"], rows))
        print(f"\nwhere our time goes ({n_big}-job run), ms:")
        print(table(["cost", "ms"], detail))
        print("\nheaviest imports of one run-job process (ms, cumulative, >= 5 ms, 3 levels):")
        print(table(["module", "ms"], [[m, t * 1e3] for m, t in top]))
        print(
            f"\ntarget: faster than snakemake: vs run: rules {s_run / o_small:.1f}x -> {verdict(s_run > o_small)}; "
            f"vs shell: rules {s_shell / o_big:.2f}x at {n_big} jobs -> {verdict(s_shell > o_big)} "
            f"(simulated 1 ms poll: {s_shell / o_fast:.2f}x)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
