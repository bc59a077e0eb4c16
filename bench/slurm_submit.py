"""SLURM submission: queue a 1,000-job and a 5,000-job study with our executor vs one sbatch per
job vs submitit (``map_array``, and one ``submit`` per job), on the local cluster, in one run.

Every job is submitted **held** (``--hold``: ours through ``executor.resources.default.extra.hold``,
submitit through ``slurm_additional_parameters={"hold": True}``), so nothing runs on the node; every
job this script queued is cancelled with ``scancel`` right after each measurement (and again by job
name at exit). The time is until the last job is in the queue; the queue is then checked with
``squeue -r`` to hold exactly the expected number of jobs.

- ours: ``python -m orchestrator submit spec --executor slurm`` (a whole process: interpreter,
  plan, job records, scripts, ``scontrol show config``, ``sbatch`` calls with per-task
  dependencies), plus, at 1,000 jobs, an in-process breakdown.
- one by one: one script and one ``sbatch --parsable`` per job in the same DAG order, each with
  ``--dependency=afterok:`` on its upstream jobs' ids (what a per-job submitter does).
- submitit ``map_array``: one array of N Python calls (no dependencies).
- submitit ``submit`` per job (1,000 only): N sbatch calls. submitit sleeps 0.2 s between
  individual submits (its ``_throttling``); that is measured on 50 jobs and, for the full N,
  switched off.
- ``status`` of the 5,000-job study while its jobs are queued: the whole CLI process.

Study shapes (prep -> point -> gather): 1,000 = 27 x 6 x 6 (each point follows its language's prep
task: 27 arrays, one per prep task); 5,000 = 2 x 50 x 50 (2,500 points per prep task, more than
MaxArraySize: 3 arrays per language).

Targets (issue 14): ours >= 10x faster than one-by-one sbatch and within 1.5x of submitit's
map_array (ours as a whole CLI process, with dependencies; map_array timed in this process,
without any); status at 5,000 jobs under 1 s.

    python bench/slurm_submit.py            # 1,000 and 5,000 jobs (about 5 minutes)
    python bench/slurm_submit.py --quick    # 100 jobs
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import PYTHON, env, header, n_jobs, run, study_yaml, table, verdict

NAME = f"bsub{os.getpid()}"
SIZES = {"1k": (27, 6, 6), "5k": (2, 50, 50), "quick": (9, 2, 5)}  # 1,000 jobs; 2 + 5,000 + 1; 9 + 90 + 1 = 100
JOB_NAMES: set[str] = set()


def noop(i: int) -> int:
    return i


def squeue_count(ids: list[str]) -> int:
    if not ids:
        return 0
    out = run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i"]).stdout
    return len(out.split())


def scancel(ids: list[str]) -> None:
    for i in range(0, len(ids), 500):
        subprocess.run(["scancel", *ids[i : i + 500]], capture_output=True)
    deadline = time.monotonic() + 60
    while squeue_count(ids) and time.monotonic() < deadline:
        time.sleep(0.5)


def cleanup() -> None:
    for name in JOB_NAMES:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True)


# ------------------------------------------------------------------------------- ours
def write_spec(tmp: Path, dims: tuple[int, int, int], tag: str) -> Path:
    spec = tmp / f"{tag}.yaml"
    text = study_yaml(f"{NAME}", *dims, root=tmp / f"store-{tag}")
    text = text.replace(
        "executor: {backend: local, local: {max_parallel: 2}}",
        "executor:\n  backend: slurm\n  resources: {default: {time_min: 5, extra: {hold: ''}}}",
    )
    spec.write_text(text)
    JOB_NAMES.update(f"{NAME}.{s}" for s in ("prep", "point", "gather"))
    return spec


def submitted_ids(store: Path) -> list[str]:
    from orchestrator.executors.slurm import submitted_ids as ids_of
    from orchestrator.paths import StudyPaths

    return ids_of(StudyPaths(store, NAME))


def ours_cli(tmp: Path, dims: tuple[int, int, int], *, status: bool = False) -> tuple[float, int, float | None]:
    """(seconds to queue every job, sbatch submissions, seconds of a ``status`` call meanwhile)."""
    tag = f"cli-{n_jobs(*dims)}"
    spec = write_spec(tmp, dims, tag)
    t0 = time.perf_counter()
    run([PYTHON, "-m", "orchestrator", "submit", str(spec)], cwd=tmp)
    seconds = time.perf_counter() - t0
    ids = submitted_ids(tmp / f"store-{tag}")
    queued = squeue_count(ids)
    status_s = None
    if status:
        t0 = time.perf_counter()
        out = run([PYTHON, "-m", "orchestrator", "status", NAME, "--store", str(tmp / f"store-{tag}")], cwd=tmp)
        status_s = time.perf_counter() - t0
        assert f"{n_jobs(*dims)} queued" in out.stdout.splitlines()[0], out.stdout[:300]
    scancel(ids)
    assert queued == n_jobs(*dims), f"ours queued {queued} jobs, expected {n_jobs(*dims)}"
    return seconds, len(ids), status_s


def ours_breakdown(tmp: Path, dims: tuple[int, int, int]) -> dict[str, float]:
    """The same submit in-process, with the time of each phase."""
    from orchestrator.executors import slurm as slurm_mod
    from orchestrator.plan import build_plan
    from orchestrator.runner import open_store
    from orchestrator.spec import load_study

    tag = f"inproc-{n_jobs(*dims)}"
    spec = write_spec(tmp, dims, tag)
    phases: dict[str, float] = {}
    timed = [
        (slurm_mod.SlurmExecutor, "prepare", "job records + states (prepare)"),
        (slurm_mod, "layout", "layout (arrays, dependencies)"),
        (slurm_mod.SlurmExecutor, "_write_scripts", "job lists + sbatch scripts"),
        (slurm_mod.SlurmExecutor, "_submit_all", "sbatch calls"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in timed]

    def wrap(original: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0

        return wrapper

    for (owner, name, label), (_, _, original) in zip(timed, originals, strict=True):
        setattr(owner, name, wrap(original, label))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        t0 = time.perf_counter()
        study, registry = load_study(spec)
        plan = build_plan(study, registry)
        phases["load + plan"] = time.perf_counter() - t0
        paths = slurm_mod.StudyPaths(study.storage.root.resolve(), study.name)
        t1 = time.perf_counter()
        slurm_mod.SlurmExecutor(paths, open_store(paths.root), echo=lambda s: None).submit(plan, spec)
        phases["total submit()"] = time.perf_counter() - t1
    finally:
        os.chdir(cwd)
        for owner, name, original in originals:
            setattr(owner, name, original)
    ids = submitted_ids(tmp / f"store-{tag}")
    queued = squeue_count(ids)
    scancel(ids)
    assert queued == n_jobs(*dims)
    known = sum(v for k, v in phases.items() if k not in ("total submit()", "load + plan", "layout (arrays, dependencies)"))
    phases["rest (lock, limits, cache check)"] = phases["total submit()"] - known
    return phases


# --------------------------------------------------------------------------- baselines
def one_by_one(tmp: Path, dims: tuple[int, int, int]) -> float:
    """One sbatch per job, dependencies on the upstream jobs' ids, in the plan's order."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_study

    study, registry = load_study(write_spec(tmp, dims, "obo-plan"))
    plan = build_plan(study, registry)  # only for the DAG: not timed
    name = f"{NAME}-obo"
    JOB_NAMES.add(name)
    scripts = tmp / f"obo-{len(plan.jobs)}"
    scripts.mkdir()
    ids: dict[str, str] = {}
    t0 = time.perf_counter()
    for n, job in enumerate(plan.jobs):
        script = scripts / f"{n:05d}.sh"
        script.write_text(
            f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --output={scripts}/%j.out\n"
            f"#SBATCH --time=5\n#SBATCH --hold\n{PYTHON} -m orchestrator run-job {job.key}.json\n"
        )
        deps = [ids[d] for d in job.deps]
        cmd = ["sbatch", "--parsable", *([f"--dependency=afterok:{':'.join(deps)}"] if deps else []), str(script)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        ids[job.key] = out.stdout.strip().split(";")[0]
    seconds = time.perf_counter() - t0
    queued = squeue_count(list(ids.values()))
    scancel(list(ids.values()))
    assert queued == len(plan.jobs), (queued, len(plan.jobs))
    return seconds


def submitit_executor(folder: Path, name: str):  # type: ignore[no-untyped-def]
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(name=name, timeout_min=5, slurm_additional_parameters={"hold": True})
    JOB_NAMES.add(name)
    return ex


def submitit_array(tmp: Path, n: int, max_array_size: int) -> float:
    """map_array in calls of at most MaxArraySize (submitit does not split: a larger one fails
    with SLURM's "Invalid job array specification")."""
    ex = submitit_executor(tmp / f"submitit-array-{n}", f"{NAME}-sa")
    t0 = time.perf_counter()
    jobs = [job for i in range(0, n, max_array_size) for job in ex.map_array(noop, list(range(i, min(n, i + max_array_size))))]
    seconds = time.perf_counter() - t0
    ids = sorted({j.job_id.split("_")[0] for j in jobs})
    queued = squeue_count(ids)
    scancel(ids)
    assert queued == n, (queued, n)
    return seconds


MAP_ARRAY_SCRIPT = """\
import sys
import submitit

def noop(i):
    return i

folder, name, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
ex.update_parameters(name=name, timeout_min=5, slurm_additional_parameters={"hold": True})
jobs = [job for i in range(0, n, size) for job in ex.map_array(noop, list(range(i, min(n, i + size))))]
print(" ".join(sorted({job.job_id.split("_")[0] for job in jobs})))
"""


def submitit_array_process(tmp: Path, n: int, max_array_size: int) -> float:
    """The same map_array calls as a whole process (interpreter, imports), as ours is timed."""
    script = tmp / "map_array.py"
    script.write_text(MAP_ARRAY_SCRIPT)
    name = f"{NAME}-sap"
    JOB_NAMES.add(name)
    t0 = time.perf_counter()
    out = run([PYTHON, str(script), str(tmp / f"submitit-process-{n}"), name, str(n), str(max_array_size)], cwd=tmp)
    seconds = time.perf_counter() - t0
    ids = out.stdout.split()
    queued = squeue_count(ids)
    scancel(ids)
    assert queued == n, (queued, n)
    return seconds


def submitit_each(tmp: Path, n: int, throttle: bool) -> float:
    ex = submitit_executor(tmp / f"submitit-each-{throttle}-{n}", f"{NAME}-se")
    if not throttle:
        ex._executor._throttling = 0.0  # private: submitit sleeps 0.2 s between submits by default
    t0 = time.perf_counter()
    jobs = [ex.submit(noop, i) for i in range(n)]
    seconds = time.perf_counter() - t0
    ids = [j.job_id for j in jobs]
    queued = squeue_count(ids)
    scancel(ids)
    assert queued == n, (queued, n)
    return seconds


def measure(
    tmp: Path, dims: tuple[int, int, int], max_array_size: int, *, detail: bool
) -> tuple[list[list[object]], dict[str, float]]:
    """The rows of one study size (``detail``: with the in-process breakdown and submitit per job)."""
    n = n_jobs(*dims)
    ours, submissions, status_s = ours_cli(tmp, dims, status=True)
    obo = one_by_one(tmp, dims)
    sa = submitit_array(tmp, n, max_array_size)
    sap = submitit_array_process(tmp, n, max_array_size)
    rows: list[list[object]] = [
        [f"ours: orchestrator submit ({submissions} sbatch, per-task deps)", n, ours, ours / n * 1e3, 1.0],
        ["one sbatch per job (with afterok deps)", n, obo, obo / n * 1e3, obo / ours],
        [f"submitit map_array ({-(-n // max_array_size)} array(s), no deps), in-process", n, sa, sa / n * 1e3, sa / ours],
        ["submitit map_array, the same as a whole process", n, sap, sap / n * 1e3, sap / ours],
    ]
    found = {"ours": ours, "obo": obo, "map_array": sap, "map_array_inproc": sa, "status": status_s or 0.0}
    if detail:
        phases = ours_breakdown(tmp, dims)
        se = submitit_each(tmp, n, throttle=False)
        throttled_n = min(50, n)
        se_throttled = submitit_each(tmp, throttled_n, throttle=True)
        rows += [
            ["ours in-process: submit()", n, phases["total submit()"], phases["total submit()"] / n * 1e3,
             phases["total submit()"] / ours],  # fmt: skip
            ["submitit submit per job, no throttle", n, se, se / n * 1e3, se / ours],
            [
                f"submitit submit per job, default 0.2 s throttle ({throttled_n} jobs; ratio for {n})",
                throttled_n,
                se_throttled,
                se_throttled / throttled_n * 1e3,
                se_throttled / throttled_n * n / ours,
            ],
        ]
        print("ours, in-process breakdown (seconds):")
        print(table(["phase", "seconds"], [[k, v] for k, v in phases.items()]) + "\n")
    return rows, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 jobs instead of 1,000 and 5,000")
    args = ap.parse_args()
    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        raise SystemExit("no SLURM cluster here: start one with `bash scripts/slurm/start-local-slurm.sh --accounting`")
    header("SLURM submission: our arrays vs one sbatch per job vs submitit")
    atexit.register(cleanup)
    tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    os.environ.update({k: v for k, v in env().items() if k == "PYTHONPATH"})
    config = run(["scontrol", "show", "config"]).stdout.splitlines()
    limits = [f"{line.split()[0]}={line.split()[-1]}" for line in config if line.startswith(("MaxArraySize", "MaxJobCount"))]
    print("cluster: " + ", ".join(limits))
    results = {}
    for size in ["quick"] if args.quick else ["1k", "5k"]:
        dims = SIZES[size]
        n = n_jobs(*dims)
        shape = "x".join(map(str, dims))
        print(f"\n## {n} jobs ({shape} study: prep -> point -> gather), all held, cancelled after each measurement\n")
        rows, found = measure(tmp, dims, int(re.search(r"MaxArraySize\s*=\s*(\d+)", "\n".join(config))[1]), detail=size != "5k")
        results[n] = found
        print(table(["method", "jobs", "seconds", "ms/job", "time / ours (>1: ours faster)"], rows))
    print()
    for n, f in results.items():
        fast, near = f["obo"] / f["ours"], f["ours"] / f["map_array"]
        print(
            f"{n} jobs: ours {fast:.1f}x faster than one-by-one sbatch (target >= 10x: {verdict(fast >= 10)}); "
            f"ours / map_array, both whole processes = {near:.2f} (target <= 1.5: {verdict(near <= 1.5)}); "
            f"status {f['status']:.2f} s (target < 1 s: {verdict(f['status'] < 1)})"
        )
    print("(ours, status and the second map_array row are whole processes, interpreter start included;")
    print(" the other baselines are timed inside this process)")
    cleanup()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
