"""``python -m orchestrator``: validate, plan, submit, status, artifacts, run-job.

Errors are printed without a traceback: exit code 2 for an invalid spec (nothing ran), 1 for a
failed job or another error (the message says where to look), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator import console, loudness, program, results
from orchestrator.errors import OrchestratorError
from orchestrator.executors.registry import names as registry_names
from orchestrator.guard import guarded
from orchestrator.overrides import cli_overrides
from orchestrator.paths import DEFAULT_STORE, STORE_ENV, StudyPaths, default_root
from orchestrator.plan import Plan, build_plan
from orchestrator.spec import Study, load_study


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    console.set_level(args.verbosity)
    return guarded(lambda: args.func(args))


def _store_option(cmd: argparse.ArgumentParser) -> None:
    help_ = f"storage root (default: ${STORE_ENV}, else {DEFAULT_STORE})"
    cmd.add_argument("--store", type=Path, default=default_root(), metavar="DIR", help=help_)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program.name(), description="Run cross-lingual subnetwork studies reproducibly.")
    p.add_argument("--version", action=program.VersionAction)
    loudness.add_before_command(p)
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
    plan.set_defaults(loud_help="also each job's parameters and inputs")  # what its -v shows (loudness.py)
    submit = spec_command("submit", "run (or queue) every job that is not cached", _submit)
    submit.add_argument("--force", action="store_true", help="rerun jobs even if their outputs are committed")
    submit.add_argument(
        "--dry-run", action="store_true", help="write the job records and (SLURM) scripts and show the order; submit nothing"
    )

    for name, help_, func in (
        ("status", "every job's state, log and outputs", _status),
        ("artifacts", "what a study produced, and from what; `artifacts get REF --out DIR` copies one version out", _artifacts),
        ("cancel", "cancel the study's queued SLURM jobs", _cancel),
        ("plots", "copy the study's figures and report out of the store", _plots),
    ):
        cmd = sub.add_parser(name, help=help_, description=help_)
        cmd.add_argument("study", help="study name")
        _store_option(cmd)
        cmd.set_defaults(func=func)
    shown = sub.choices["artifacts"].add_mutually_exclusive_group()
    shown.add_argument("--lineage", metavar="NAME[:vN]", help="show the lineage tree of one artifact")
    shown.add_argument("--show", metavar="NAME[:vN]", help="show one version: its provenance (job, params, code) and inputs")
    results.add_arguments(sub.choices["status"], sub.choices["artifacts"])  # --json; artifacts get REF --out DIR
    sub.choices["plots"].add_argument(
        "--out", type=Path, metavar="DIR", help="where to put them (default: the study's figures/ folder)"
    )
    init = sub.add_parser(
        "init",
        help="write the example specs and a copy of the sbatch template into a folder, to start from",
        description="write the example specs (demo.yaml, full_study.yaml, threshold_sweep.yaml) and a copy of the "
        "sbatch template (default.sbatch) into a folder, to start from; existing files are left alone",
    )
    init.add_argument("dir", type=Path, nargs="?", default=Path("."), metavar="DIR", help="where (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite files that exist")
    init.set_defaults(func=_init)
    fsck = sub.add_parser("fsck", help="check the artifact store; remove what dead writers left behind")
    _store_option(fsck)
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
    _store_option(sync)
    sync.add_argument("--dry-run", action="store_true", help="list the run directories and the wandb sync commands only")
    sync.add_argument("--timeout", type=float, default=1800.0, metavar="S", help="stop a wandb sync after S s (default 1800)")
    sync.add_argument("--watch", action="store_true", help="upload runs as their jobs end, until all have ended (login node)")
    sync.add_argument("--interval", type=float, default=30.0, metavar="S", help="--watch: look every S s (default 30)")
    sync.set_defaults(func=_sync)
    track = sub.add_parser(
        "track",
        help="mirror a study's committed results to W&B (one run per job, as if tracked live); nothing reruns",
        description="mirror a study's committed results to W&B (one run per job, as if tracked live); nothing reruns",
    )
    track.add_argument("study", help="study name")
    _store_option(track)
    track.add_argument("--project", help="W&B project (default: the spec's tracking.project)")
    track.add_argument("--entity", help="W&B entity (default: the spec's tracking.entity, else your default)")
    track.add_argument("--mode", choices=["online", "offline"], help="default: the spec's tracking.mode, else WANDB_MODE")
    track.add_argument("--dry-run", action="store_true", help="say which jobs would be mirrored; write nothing")
    track.add_argument("--force", action="store_true", help="mirror jobs again even if their runs are in W&B already")
    track.set_defaults(func=_track)
    pull = sub.add_parser("pull", help="download a study's artifacts from W&B into a local store (see README)")
    pull.add_argument("project", metavar="ENTITY/PROJECT", help="the W&B project, as in its URL")
    pull.add_argument("study", help="study name")
    _store_option(pull)
    pull.add_argument("--dry-run", action="store_true", help="say what would be downloaded; write nothing")
    pull.set_defaults(func=_pull)

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
    loudness.add_after_command(sub)
    return p


def _load(args: argparse.Namespace) -> tuple[Study, Plan]:
    overrides = cli_overrides(args.overrides, args.executor, args.store)
    study, registry = load_study(args.spec, overrides, max_jobs=args.max_jobs)
    return study, build_plan(study, registry, max_jobs=args.max_jobs)


def _paths(study: Study) -> StudyPaths:
    return StudyPaths(study.storage.root.resolve(), study.name)


def _note_new_store(study: Study, creating: bool) -> None:
    """Say where a store that does not exist yet will be (or is being) created, on stderr: a relative
    storage.root is relative to the current directory, where status, artifacts and plots look for it."""
    paths = _paths(study)
    if paths.store.exists() or console.quiet():
        return
    head = f"creating a new store at {paths.root}" if creating else f"no store at {paths.root} yet; submit creates it there"
    root = study.storage.root
    why = "" if root.is_absolute() else f" (storage.root {str(root)!r} is relative to the current directory)"
    default = default_root()
    found = "from this directory" if not default.is_absolute() else f"through ${STORE_ENV}"
    found = found if paths.root == default.resolve() else f"with --store {paths.root}"
    print(f"note: {head}{why}; status, artifacts and plots find it {found}", file=sys.stderr)


def _validate(args: argparse.Namespace) -> int:
    study, plan = _load(args)
    _warn_cluster(plan)
    _note_new_store(study, creating=False)
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
    _note_new_store(study, creating=False)
    reasons = _reasons(plan, _paths(study))
    cached = {j.key for j in plan.jobs if j.key not in reasons}
    print(views.plan_table(plan, cached, verbose=console.verbose(), reasons=reasons))
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
        _note_new_store(study, creating=False)
        reasons = _reasons(plan, paths)
        print(views.plan_table(plan, {j.key for j in plan.jobs if j.key not in reasons}, reasons=reasons))
        return 0
    problem = None if args.dry_run else kind.unavailable()
    if problem:  # before anything is written
        raise ExecutorUnavailable(problem)
    _note_new_store(study, creating=True)
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
    return results.status_command(args)


def _artifacts(args: argparse.Namespace) -> int:
    return results.artifacts_command(args)


def _plots(args: argparse.Namespace) -> int:
    from orchestrator.artifacts import open_reader
    from orchestrator.export import export_type

    paths = StudyPaths(args.store.resolve(), args.study)
    out = (args.out or paths.dir / "figures").resolve()
    for folder in export_type(paths, open_reader(paths.root), "figures", out):
        pictures = sorted(folder.glob("*.png"))
        print(folder if console.quiet() else f"{folder}: {len(pictures)} figures (PNG + PDF)")
        for file in pictures if console.verbose() else []:
            print(f"  {file.name}")
        for page in () if console.quiet() else ("report.html", "report.md"):
            if (folder / page).exists():
                print(f"  report: {folder / page}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from orchestrator.scaffold import run_init

    return run_init(args.dir, force=args.force, prog=program.name())


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
    if not console.quiet():  # -q: only problems
        removed = f"removed {len(report.removed_temp)} leftovers of interrupted writes"
        print(f"{removed}, {len(stale)} staging folders of dead job attempts")
        for attempt in stale:
            print(f"STALE staging folder staging/{attempt} (removed)")
    for entry in report.removed_temp if console.verbose() else []:
        print(f"REMOVED tmp/{entry}")
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
        if not console.quiet():
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
    from orchestrator.sync_watch import sync_command

    paths = StudyPaths(args.store.resolve(), args.study)
    return sync_command(paths, dry_run=args.dry_run, watch=args.watch, timeout_s=args.timeout, interval_s=args.interval)


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


def _pull(args: argparse.Namespace) -> int:
    from orchestrator.tracking.pull import pull_command

    return pull_command(args.project, args.study, args.store, dry_run=args.dry_run)


def _track(args: argparse.Namespace) -> int:
    import os

    from orchestrator.tracking.mirror import track_study

    if not console.verbose():  # one line per job; wandb's own banners (a set per run) with -v
        os.environ.setdefault("WANDB_SILENT", "true")
    options = {k: getattr(args, k) for k in ("project", "entity", "mode", "dry_run", "force")}
    return 0 if track_study(StudyPaths(args.store.resolve(), args.study), **options).ok else 1
