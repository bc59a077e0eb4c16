"""``python -m orchestrator``: validate, plan, submit, status, artifacts, run-job.

Errors are printed without a traceback: exit code 2 for an invalid spec (nothing ran), 1 for a
failed job or another error (the message says where to look), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.executors.registry import names as registry_names
from orchestrator.guard import guarded
from orchestrator.overrides import cli_overrides
from orchestrator.paths import StudyPaths
from orchestrator.plan import Plan, build_plan
from orchestrator.spec import Study, load_study

DEFAULT_ROOT = Path(".orchestrator")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return guarded(lambda: args.func(args))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator", description="Run cross-lingual subnetwork studies reproducibly.")
    sub = p.add_subparsers(metavar="COMMAND")

    def spec_command(name: str, help_: str, func: object) -> argparse.ArgumentParser:
        from orchestrator.plan import DEFAULT_MAX_JOBS

        def max_jobs(text: str) -> int | None:
            try:
                n = int(text)
            except ValueError:
                n = -1
            if n < 0:
                raise argparse.ArgumentTypeError(f"expected a number of jobs (0: no limit), got {text!r}")
            return n or None

        cmd = sub.add_parser(name, help=help_, description=help_)
        cmd.add_argument("spec", type=Path, help="study spec (YAML)")
        cmd.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="override any spec field, e.g. --set stages.prune.params.threshold=1.2 (repeatable)",
        )
        cmd.add_argument("--executor", choices=registry_names(), help="override executor.backend")
        cmd.add_argument("--store", type=Path, metavar="DIR", help="override storage.root (artifacts, records, logs)")
        cmd.add_argument(
            "--max-jobs",
            type=max_jobs,
            default=DEFAULT_MAX_JOBS,
            metavar="N",
            help=f"refuse a plan of more than N jobs, before expanding it (default {DEFAULT_MAX_JOBS:,}; 0: no limit)",
        )
        cmd.set_defaults(func=func)
        return cmd

    spec_command("validate", "check a spec; nothing runs", _validate)
    spec_command(
        "prefetch",
        "download the models, tokenizers and datasets the spec's jobs load by name into the local caches "
        "(run it where there is network, e.g. a login node; see README, Running on a cluster)",
        _prefetch,
    )
    sweep = spec_command("sweep", "show a spec's sweep points, then submit them like submit", _sweep)
    sweep.add_argument("--force", action="store_true", help="rerun jobs even if their outputs are committed")
    sweep.add_argument("--dry-run", action="store_true", help="show what would run; submit nothing")
    sweep.add_argument(
        "--wandb-agents",
        type=int,
        metavar="N",
        help="let a W&B server run the sweep (grid, random or bayes): create it, queue the shared upstream jobs, "
        "then N `wandb agent` workers as one SLURM array (see README, Sweeps)",
    )
    plan = spec_command("plan", "show the job DAG and what is cached", _plan)
    plan.add_argument("--verbose", "-v", action="store_true", help="also show parameters and inputs of each job")
    submit = spec_command("submit", "run (or queue) every job that is not cached", _submit)
    submit.add_argument("--force", action="store_true", help="rerun jobs even if their outputs are committed")
    submit.add_argument(
        "--dry-run", action="store_true", help="write the job records and (SLURM) scripts and show the order; submit nothing"
    )

    for name, help_, func in (
        ("status", "every job's state, log and outputs", _status),
        ("artifacts", "what a study produced, and from what", _artifacts),
        ("cancel", "cancel the study's queued SLURM jobs", _cancel),
        ("plots", "copy the study's figures and report out of the store", _plots),
    ):
        cmd = sub.add_parser(name, help=help_, description=help_)
        cmd.add_argument("study", help="study name")
        cmd.add_argument("--store", type=Path, default=DEFAULT_ROOT, metavar="DIR", help="storage root (default: .orchestrator)")
        cmd.set_defaults(func=func)
    shown = sub.choices["artifacts"].add_mutually_exclusive_group()
    shown.add_argument("--lineage", metavar="NAME[:vN]", help="show the lineage tree of one artifact")
    shown.add_argument("--show", metavar="NAME[:vN]", help="show one version: its provenance (job, params, code) and inputs")
    sub.choices["plots"].add_argument(
        "--out", type=Path, metavar="DIR", help="where to put them (default: the study's figures/ folder)"
    )
    fsck = sub.add_parser("fsck", help="check the artifact store; remove what dead writers left behind")
    fsck.add_argument("--store", type=Path, default=DEFAULT_ROOT, metavar="DIR", help="storage root (default: .orchestrator)")
    fsck.add_argument(
        "--repair", action="store_true", help="quarantine what is damaged and drop the job records built on it (they rerun)"
    )
    fsck.set_defaults(func=_fsck)
    sync = sub.add_parser(
        "sync",
        help="upload the study's offline W&B runs (producers first) and their lineage",
        description="upload the study's offline W&B runs (producers first) and their lineage",
    )
    sync.add_argument("study", help="study name")
    sync.add_argument("--store", type=Path, default=DEFAULT_ROOT, metavar="DIR", help="storage root (default: .orchestrator)")
    sync.add_argument("--dry-run", action="store_true", help="list the run directories and the wandb sync commands only")
    sync.set_defaults(func=_sync)

    run = sub.add_parser("run-job", help="run one job from its record (what executors call)")
    run.add_argument("record", type=Path, nargs="?", help="the job's job.json")
    run.add_argument("--list", type=Path, help="a JSON list of job records (SLURM arrays) ...")
    run.add_argument("--index", type=int, default=0, help="... and which entry to run")
    run.add_argument("--force", action="store_true")
    run.add_argument("--max-requeues", type=int, default=3, help="SLURM: restarts allowed after time-limit checkpoints")
    run.set_defaults(func=_run_job)
    agent = sub.add_parser("agent-run")  # hidden (no help): what `wandb agent` starts for a sweep run
    agent.add_argument("study", type=Path, help="the frozen study of a W&B sweep")
    agent.set_defaults(func=_agent_run)
    return p


def _load(args: argparse.Namespace) -> tuple[Study, Plan]:
    overrides = cli_overrides(args.overrides, args.executor, args.store)
    study, registry = load_study(args.spec, overrides, max_jobs=args.max_jobs)
    return study, build_plan(study, registry, max_jobs=args.max_jobs)


def _paths(study: Study) -> StudyPaths:
    return StudyPaths(study.storage.root.resolve(), study.name)


def _validate(args: argparse.Namespace) -> int:
    study, plan = _load(args)
    _warn_cluster(plan)
    print(f"{args.spec}: ok - study {study.name!r}, {len(study.stages)} stages, {len(plan.jobs)} jobs")
    return 0


def _warn_cluster(plan: Plan) -> None:
    """What the study's executor backend warns about (e.g. SLURM: a partition left to the cluster's
    default), one line each on stderr."""
    from orchestrator.executors.registry import backend

    for line in backend(plan.study.executor.backend).warnings(plan):
        print(line, file=sys.stderr)


def _prefetch(args: argparse.Namespace) -> int:
    from orchestrator.prefetch import prefetch
    from orchestrator.stage import load_registry

    study, plan = _load(args)
    return prefetch(plan, load_registry(study.stage_package))


def _plan(args: argparse.Namespace) -> int:
    from orchestrator import views

    study, plan = _load(args)
    reasons = _reasons(plan, _paths(study))
    cached = {j.key for j in plan.jobs if j.key not in reasons}
    print(views.plan_table(plan, cached, verbose=args.verbose, reasons=reasons))
    return 0


def _reasons(plan: Plan, paths: StudyPaths) -> dict[str, str]:
    """Why each of the plan's jobs that is not cached in the study's store must run."""
    from orchestrator.artifacts import open_store
    from orchestrator.executors.base import run_reasons
    from orchestrator.lineage import NOT_RUN

    if not paths.store.exists():
        return {job.key: NOT_RUN for job in plan.jobs}
    return run_reasons(plan, open_store(paths.root), force=False)


def _submit(args: argparse.Namespace) -> int:
    from orchestrator import views
    from orchestrator.artifacts import open_store
    from orchestrator.errors import ExecutorUnavailable
    from orchestrator.executors.registry import backend

    study, plan = _load(args)
    _warn_cluster(plan)
    paths = _paths(study)
    kind = backend(study.executor.backend)
    if args.dry_run and not kind.writes_scripts:  # nothing to write: show what would run
        reasons = _reasons(plan, paths)
        print(views.plan_table(plan, {j.key for j in plan.jobs if j.key not in reasons}, reasons=reasons))
        return 0
    problem = None if args.dry_run else kind.unavailable()
    if problem:  # before anything is written
        raise ExecutorUnavailable(problem)
    executor = kind.from_study(study, paths, open_store(paths.root), dry_run=args.dry_run)
    report = executor.submit(plan, args.spec, force=args.force)
    if not args.dry_run:
        print(views.report_summary(plan, report, paths))
    return 0 if report.ok else (130 if report.interrupted else 1)


def _sweep(args: argparse.Namespace) -> int:
    from collections import Counter

    if args.wandb_agents is not None:
        from orchestrator.sweeps.submit import submit_agents

        overrides = cli_overrides(args.overrides, args.executor, args.store)
        return submit_agents(args.spec, overrides, args.wandb_agents, dry_run=args.dry_run, force=args.force)
    study, plan = _load(args)
    axes = study.sweep_axes()
    if not axes:
        raise OrchestratorError(f"{args.spec} has no sweep section; see README (Sweeps) or use submit")
    print(f"sweep ({(study.sweep or {}).get('method')}) of study {study.name}:")
    for axis in axes:
        targets = ", ".join(f"{s}.{p}" for s, p in axis.targets)
        print(f"  axis {axis.name}: {len(axis.values)} points over {targets}")
    per_stage = Counter(job.stage_id for job in plan.jobs)
    print("  jobs per stage: " + ", ".join(f"{sid} {n}" for sid, n in per_stage.items()))
    return _submit(args)


def _status(args: argparse.Namespace) -> int:
    from orchestrator import views
    from orchestrator.executors import StatusView
    from orchestrator.executors.registry import backend, names

    paths = StudyPaths(args.store.resolve(), args.study)
    states = views.job_states(paths)
    by_key = {str(job["key"]): state for job, state in states}
    view = StatusView()
    for name in names():  # each backend's word on the jobs it ran or queued
        view.merge(backend(name).status(paths, by_key))
    if view.warning:
        print(f"warning: {view.warning}", file=sys.stderr)
    print(views.status_table(paths, view, states))
    return 0


def _artifacts(args: argparse.Namespace) -> int:
    from orchestrator import views
    from orchestrator.artifacts import open_store

    paths = StudyPaths(args.store.resolve(), args.study)
    store = open_store(paths.root)
    if args.lineage:
        print(views.lineage_tree(store, args.lineage))
    elif args.show:
        print(views.version_details(store, args.show))
    else:
        print(views.artifact_table(paths, store))
    return 0


def _plots(args: argparse.Namespace) -> int:
    from orchestrator.artifacts import open_store
    from orchestrator.export import export_type

    paths = StudyPaths(args.store.resolve(), args.study)
    out = (args.out or paths.dir / "figures").resolve()
    for folder in export_type(paths, open_store(paths.root), "figures", out):
        pictures = sorted(folder.glob("*.png"))
        print(f"{folder}: {len(pictures)} figures (PNG + PDF)")
        for page in ("report.html", "report.md"):
            if (folder / page).exists():
                print(f"  report: {folder / page}")
    return 0


def _fsck(args: argparse.Namespace) -> int:
    from orchestrator.artifacts import ArtifactNotFound, LocalStore
    from orchestrator.runner import clean_stale_attempts

    root = args.store.resolve() / "artifacts"
    try:
        store = LocalStore(root, create=False)  # a check must not create the store it checks
    except ArtifactNotFound:
        print(f"error: no artifact store at {root}: it does not exist; pass the storage root with --store DIR", file=sys.stderr)
        return 1
    report = store.fsck(repair=args.repair)
    stale = clean_stale_attempts(args.store.resolve())
    print(
        f"removed {len(report.removed_temp)} leftovers of interrupted writes, {len(stale)} staging folders of dead job attempts"
    )
    for attempt in stale:
        print(f"STALE staging folder staging/{attempt} (removed)")
    for label, lines in (
        ("CORRUPT", report.corrupt),
        ("DAMAGED", report.damaged),
        ("DANGLING job record", report.dangling_jobs),
        ("STALE job record", report.stale_jobs),
        ("QUARANTINED", report.quarantined),
        ("DROPPED job record", report.dropped_jobs),
        ("NOT REPAIRED", report.unrepaired),
    ):
        for line in lines:
            print(f"{label} {line}")
    if report.ok:
        print("store ok")
    elif report.healthy:
        print("store repaired: submit again to rerun the dropped jobs (that also restores quarantined files)")
    else:
        print("store has problems (see above)" + ("" if args.repair else "; `fsck --repair` puts them right"))
    return 0 if report.healthy else 1


def _cancel(args: argparse.Namespace) -> int:
    from orchestrator.executors.registry import backend, names

    paths = StudyPaths(args.store.resolve(), args.study)
    stopped = {name: backend(name).cancel(paths) for name in names()}
    if all(ids is None for ids in stopped.values()):
        raise OrchestratorError(f"study {paths.study!r} has nothing an executor could cancel under {paths.root}")
    for name, ids in stopped.items():
        if ids:
            print(f"cancelled {backend(name).label or name} jobs {', '.join(ids)}")
    if not any(stopped.values()):
        print("nothing to cancel")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from orchestrator.sync import sync_study

    report = sync_study(StudyPaths(args.store.resolve(), args.study), dry_run=args.dry_run)
    return 0 if report.ok else 1


def _agent_run(args: argparse.Namespace) -> int:
    from orchestrator.sweeps.agent_run import agent_run

    return agent_run(args.study)


def _run_job(args: argparse.Namespace) -> int:
    from orchestrator.runner import run_job

    if args.list is not None:  # a SLURM array task (the SLURM backend's batch scripts run this)
        from orchestrator.executors.slurm.job import run_listed_job

        return run_listed_job(args.list, args.index, force=args.force, max_requeues=args.max_requeues)
    if args.record is None:
        raise OrchestratorError("run-job needs a job record (JOB.json) or --list FILE --index N")
    return run_job(args.record, force=args.force, final=True)
