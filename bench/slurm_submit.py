"""SLURM submission: queue a 1,000-job study with our executor (one array per stage) vs one sbatch
per job vs submitit (``map_array``, and one ``submit`` per job), on the local cluster, in one run.

Every job is submitted **held** (``--hold``: ours through ``executor.resources.default.extra.hold``,
submitit through ``slurm_additional_parameters={"hold": True}``), so nothing runs on the node; every
job this script queued is cancelled with ``scancel`` right after each measurement (and again by job
name at exit). The time is until the last job is in the queue; the queue is then checked with
``squeue -r`` to hold exactly the expected number of jobs.

- ours: ``python -m orchestrator submit spec --executor slurm`` (a whole process: plan, job records,
  scripts, 3 ``sbatch`` calls with ``afterok`` dependencies), plus an in-process breakdown.
- one by one: one script and one ``sbatch --parsable`` per job in the same DAG order, each with
  ``--dependency=afterok:`` on its upstream jobs' ids (what a per-job submitter does).
- submitit ``map_array``: one array of N Python calls (no dependencies).
- submitit ``submit`` per job: N sbatch calls. submitit sleeps 0.2 s between individual submits
  (its ``_throttling``); that is measured on 50 jobs and, for the full N, switched off.

Target (issue 8): ours at least 10x faster than one-by-one sbatch.

    python bench/slurm_submit.py            # 1,000 jobs (about 2 minutes)
    python bench/slurm_submit.py --quick    # 100 jobs
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import PYTHON, env, header, n_jobs, run, study_yaml, table, verdict

NAME = f"bsub{os.getpid()}"
SIZES = {"full": (27, 6, 6), "quick": (9, 2, 5)}  # 27 + 27*36 + 1 = 1,000 jobs; 9 + 90 + 1 = 100
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
        "executor: {backend: local, max_parallel: 2}",
        "executor:\n  backend: slurm\n  resources: {default: {time_min: 5, extra: {hold: ''}}}",
    )
    spec.write_text(text)
    JOB_NAMES.update(f"{NAME}.{s}" for s in ("prep", "point", "gather"))
    return spec


def submitted_ids(store: Path) -> list[str]:
    from orchestrator.executors.slurm import latest_submission
    from orchestrator.paths import StudyPaths

    sub = latest_submission(StudyPaths(store, NAME))
    return list(sub["ids"].values()) if sub else []  # type: ignore[union-attr]


def ours_cli(tmp: Path, dims: tuple[int, int, int]) -> float:
    spec = write_spec(tmp, dims, "cli")
    t0 = time.perf_counter()
    run([PYTHON, "-m", "orchestrator", "submit", str(spec)], cwd=tmp)
    seconds = time.perf_counter() - t0
    ids = submitted_ids(tmp / "store-cli")
    queued = squeue_count(ids)
    scancel(ids)
    assert queued == n_jobs(*dims), f"ours queued {queued} jobs, expected {n_jobs(*dims)}"
    return seconds


def ours_breakdown(tmp: Path, dims: tuple[int, int, int], *, one_sync: bool = False) -> dict[str, float]:
    """The same submit in-process, with the time of each phase. ``one_sync`` simulates the engine
    change this benchmark suggests: job records and states written atomically (rename) but not
    fsynced one by one, then a single ``os.sync()`` before returning (timed)."""
    from orchestrator.executors import slurm as slurm_mod
    from orchestrator.plan import build_plan
    from orchestrator.runner import open_store
    from orchestrator.spec import load_study

    tag = "inproc-sync" if one_sync else "inproc"
    spec = write_spec(tmp, dims, tag)
    phases: dict[str, float] = {}

    def timed_method(cls: type, name: str, label: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def wrapper(self, *a, **kw):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return original(self, *a, **kw)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0

        setattr(cls, name, wrapper)

    timed_method(slurm_mod.SlurmExecutor, "prepare", "job records + states (prepare)")
    timed_method(slurm_mod.SlurmExecutor, "_write_scripts", "sbatch scripts")
    timed_method(slurm_mod.SlurmExecutor, "_submit_all", "sbatch calls (3)")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        t0 = time.perf_counter()
        study, registry = load_study(spec)
        plan = build_plan(study, registry)
        phases["load + plan"] = time.perf_counter() - t0
        paths = slurm_mod.StudyPaths(study.storage.root.resolve(), study.name)
        ex = slurm_mod.SlurmExecutor(paths, open_store(paths.root), echo=lambda s: None)
        real_fsync = os.fsync
        if one_sync:
            os.fsync = lambda fd: None  # type: ignore[assignment]
        t1 = time.perf_counter()
        try:
            ex.submit(plan, spec)
            if one_sync:
                os.sync()
        finally:
            os.fsync = real_fsync
        phases["total submit()"] = time.perf_counter() - t1
    finally:
        os.chdir(cwd)
        for cls, name in (
            (slurm_mod.SlurmExecutor, "prepare"),
            (slurm_mod.SlurmExecutor, "_write_scripts"),
            (slurm_mod.SlurmExecutor, "_submit_all"),
        ):
            setattr(cls, name, getattr(cls, name).__wrapped__)
    ids = submitted_ids(tmp / f"store-{tag}")
    queued = squeue_count(ids)
    scancel(ids)
    assert queued == n_jobs(*dims)
    known = sum(v for k, v in phases.items() if k not in ("total submit()", "load + plan"))
    phases["queued states + rest"] = phases["total submit()"] - known
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
    scripts = tmp / "obo"
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


def submitit_array(tmp: Path, n: int) -> float:
    ex = submitit_executor(tmp / "submitit-array", f"{NAME}-sa")
    t0 = time.perf_counter()
    jobs = ex.map_array(noop, list(range(n)))
    seconds = time.perf_counter() - t0
    ids = sorted({j.job_id.split("_")[0] for j in jobs})
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 jobs instead of 1,000")
    args = ap.parse_args()
    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        raise SystemExit("no SLURM cluster here: start one with `bash scripts/slurm/start-local-slurm.sh --accounting`")
    header("SLURM submission: our arrays vs one sbatch per job vs submitit")
    atexit.register(cleanup)
    dims = SIZES["quick" if args.quick else "full"]
    n = n_jobs(*dims)
    tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    os.environ.update({k: v for k, v in env().items() if k == "PYTHONPATH"})
    print(f"{n} jobs ({'x'.join(map(str, dims))} study: prep -> point -> gather), all held, cancelled after each measurement\n")

    ours = ours_cli(tmp, dims)
    phases = ours_breakdown(tmp, dims)
    synced = ours_breakdown(tmp, dims, one_sync=True)
    obo = one_by_one(tmp, dims)
    sa = submitit_array(tmp, n)
    se = submitit_each(tmp, n, throttle=False)
    throttled_n = min(50, n)
    se_throttled = submitit_each(tmp, throttled_n, throttle=True)

    rows = [
        ["ours: orchestrator submit (3 arrays)", n, ours, ours / n * 1e3, 1.0],
        [
            "ours in-process: submit() as is",
            n,
            phases["total submit()"],
            phases["total submit()"] / n * 1e3,
            phases["total submit()"] / ours,
        ],
        [
            "ours in-process, simulated: no fsync per record, one os.sync()",
            n,
            synced["total submit()"],
            synced["total submit()"] / n * 1e3,
            synced["total submit()"] / ours,
        ],
        ["one sbatch per job (with afterok deps)", n, obo, obo / n * 1e3, obo / ours],
        ["submitit map_array (1 array)", n, sa, sa / n * 1e3, sa / ours],
        ["submitit submit per job, no throttle", n, se, se / n * 1e3, se / ours],
        [
            f"submitit submit per job, default 0.2 s throttle ({throttled_n} jobs; ratio for {n})",
            throttled_n,
            se_throttled,
            se_throttled / throttled_n * 1e3,
            se_throttled / throttled_n * n / ours,
        ],
    ]
    print(table(["method", "jobs", "seconds", "ms/job", "time / ours (>1: ours faster)"], rows))
    print("\nours, in-process breakdown (seconds):")
    print(table(["phase", "as is", "simulated one sync"], [[k, v, synced[k]] for k, v in phases.items()]))
    print(
        f"\ntarget: ours >= 10x faster than one-by-one sbatch: {obo / ours:.1f}x -> {verdict(obo / ours >= 10)}"
        f" (simulated one-sync submit() in-process: {obo / synced['total submit()']:.1f}x)"
    )
    print(
        f"sbatch itself costs {obo / n * 1e3:.1f} ms here (idle controller on this machine); ours makes 3 calls, one by one {n}."
    )
    print("(ours is a whole CLI process, interpreter start included; the baselines are timed inside this process)")
    cleanup()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
