"""Planning cost: load_study + build_plan vs ``snakemake -n`` on the same DAG, in the same run.

The study (benchstages, see common.study_yaml) is prep (per language) -> point (languages x
thresholds x seeds) -> gather (all points). The Snakefile has the same rules and wildcards, so
both tools expand the same number of jobs (Snakemake adds its ``all`` target rule: +1 job).

Ours is timed in-process (imports done once, as a long-lived tool or a notebook sees it) and as a
CLI process (``python -m orchestrator validate``: interpreter start, imports, load, plan), the
Snakemake dry run as the process users run. Times are the best of a few runs (the machine is shared).

Target (issue 8): 10,000 jobs planned in under 1 s, at least 20x faster than Snakemake.

    python bench/plan.py            # ~100, ~1,000, ~10,000 jobs (about 1 minute)
    python bench/plan.py --quick    # ~100, ~1,000 jobs
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

from common import PYTHON, best_of, header, n_jobs, run, snakefile, study_yaml, table, tool, verdict

SIZES = [(5, 4, 5), (10, 10, 10), (20, 25, 20)]  # languages, thresholds, seeds: 106, 1,011, 10,021 jobs


def plan_in_process(spec: Path) -> int:
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_study

    study, registry = load_study(spec)
    return len(build_plan(study, registry).jobs)


def plan_cli(spec: Path) -> int:
    out = run([PYTHON, "-m", "orchestrator", "validate", str(spec)]).stdout
    return int(re.search(r"(\d+) jobs", out)[1])


def snakemake_dry_run(workdir: Path) -> int:
    out = run(
        [tool("snakemake"), "-n", "--cores", "1", "--quiet", "rules", "-s", str(workdir / "Snakefile"), "-d", str(workdir)],
        cwd=workdir,
    )
    m = re.search(r"^total\s+(\d+)", out.stdout + out.stderr, re.M)
    if not m:
        raise SystemExit(f"no job count in snakemake's output:\n{out.stdout[-2000:]}")
    return int(m[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~100 and ~1,000 jobs only")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    args = ap.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    header("planning: load_study + build_plan vs snakemake -n")
    tmp = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        report(args, sizes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args: argparse.Namespace, sizes: list[tuple[int, int, int]], tmp: Path) -> None:
    # fixed costs: a one-job study / Snakefile
    one = tmp / "one"
    one.mkdir()
    (one / "spec.yaml").write_text(study_yaml("one", 1, 1, 1, root=tmp / "store"))
    (one / "Snakefile").write_text(snakefile(1, 1, 1))
    cli_start, _ = best_of(args.repeat, lambda: plan_cli(one / "spec.yaml"))
    sm_start, _ = best_of(2, lambda: snakemake_dry_run(one))
    print(f"fixed cost of a 3-job plan: ours (CLI process) {cli_start:.2f} s, snakemake -n {sm_start:.2f} s\n")

    rows, summary = [], {}
    for dims in sizes:
        work = tmp / f"n{n_jobs(*dims)}"
        work.mkdir()
        spec = work / "spec.yaml"
        spec.write_text(study_yaml("bench", *dims, root=tmp / "store"))
        (work / "Snakefile").write_text(snakefile(*dims))
        plan_in_process(spec)  # warm the imports once
        ours, jobs = best_of(args.repeat, lambda spec=spec: plan_in_process(spec))
        cli, cli_jobs = best_of(args.repeat, lambda spec=spec: plan_cli(spec))
        sm_reps = 1 if n_jobs(*dims) > 5000 else 2
        sm, sm_jobs = best_of(sm_reps, lambda work=work: snakemake_dry_run(work))
        assert jobs == cli_jobs == n_jobs(*dims) and sm_jobs == jobs + 1, (jobs, cli_jobs, sm_jobs)
        rows.append(
            [
                f"{'x'.join(map(str, dims))}",
                jobs,
                ours,
                ours / jobs * 1e6,
                cli,
                sm,
                sm / sm_jobs * 1e6,
                sm / ours,
                sm / cli,
                (sm - sm_start) / max(ours, 1e-9),
            ]
        )
        summary[jobs] = (ours, sm, cli)
    print(
        table(
            [
                "langs x thr x seeds",
                "jobs",
                "ours s",
                "ours us/job",
                "ours CLI s",
                "snakemake s",
                "snakemake us/job",
                "speedup",
                "CLI speedup",
                "speedup excl. sm start",
            ],
            rows,
        )
    )
    biggest = max(summary)
    ours, sm, cli = summary[biggest]
    print(
        f"\nspeedup = snakemake -n wall time / ours in-process; CLI speedup = snakemake -n / `python -m orchestrator validate`"
        f" (both whole processes); 'excl. sm start' subtracts snakemake's fixed {sm_start:.2f} s."
    )
    if biggest >= 10000:
        print(f"target: 10,000 jobs in < 1 s: {ours:.2f} s -> {verdict(ours < 1.0)}")
    print(
        f"target: >= 20x faster than snakemake at {biggest:,} jobs: {sm / ours:.1f}x in-process, "
        f"{sm / cli:.1f}x process to process -> {verdict(sm / ours >= 20)} (in-process), {verdict(sm / cli >= 20)} (CLI)"
    )


if __name__ == "__main__":
    main()
