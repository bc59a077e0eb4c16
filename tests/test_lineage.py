"""Lineage you can trust: one run per job key at a time, results current only for the input
versions they were built from, stages that cannot change what the store committed.

Every test runs real ``python -m orchestrator`` processes on the toy ``tokens``/``follow`` stages,
which write one token per run into every file and note each run in $TOYSTAGES_RUNLOG, so that a
torn version (files of two runs) or a duplicate run is visible.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.artifacts import ArtifactRef
from orchestrator.exitcodes import EXIT_ABORTED, EXIT_INTERRUPTED
from orchestrator.paths import StudyPaths
from orchestrator.plan import build_plan
from orchestrator.records import JobRecord, write_job_record
from orchestrator.runner import EXIT_FAILED, open_store, run_job
from orchestrator.spec import load_study
from orchestrator.stageproc import REPEAT_WINDOW_S

SPEC = """\
name: {name}
languages: [en, de, fr]
stage_package: lineagestages
stages:
  tokens:
    matrix: {{language: "${{languages}}"}}
    params: {{sleep_s: {sleep}}}
  follow:
    matrix: {{language: "${{languages}}"}}
    inputs: {{src: {{stage: tokens, output: a}}}}
    params: {{sleep_s: {sleep}}}
"""
UPSTREAM_ONLY = SPEC[: SPEC.index("  follow:")]  # the tokens stage alone


def write_spec(folder: Path, name: str = "lin", sleep: float = 0.0, text: str = SPEC) -> Path:
    path = folder / f"{name}-{len(text)}.yaml"
    path.write_text(text.format(name=name, sleep=sleep))
    return path


def cli(*args: str, runlog: Path | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, **({"TOYSTAGES_RUNLOG": str(runlog)} if runlog else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def torn_versions(root: Path) -> list[str]:
    """Every version of the store whose files carry more than one run token."""
    store = open_store(root)
    torn = []
    for name in store.names():
        for version in store.versions(name):
            folder = store.materialize(version.ref)
            tokens = {json.loads((folder / f.path).read_text())["token"] for f in version.files}
            if len(tokens) != 1:
                torn.append(f"{version.ref}: {sorted(tokens)}")
    return torn


def runs(runlog: Path) -> Counter[str]:
    return Counter(line.split()[0] for line in runlog.read_text().splitlines()) if runlog.exists() else Counter()


@pytest.mark.parametrize("studies", [1, 2], ids=["one-study", "two-studies-sharing-keys"])
def test_concurrent_submits_run_each_job_once_and_never_tear_a_version(tmp_path: Path, studies: int) -> None:
    """Four submits at once, of one study or of two studies whose jobs have the same keys: each
    job's stage runs once in all, every version holds the files of one run, all four succeed."""
    root, runlog = tmp_path / "root", tmp_path / "runs.log"
    specs = [write_spec(tmp_path, f"lin{i}", sleep=0.3) for i in range(studies)]
    procs = [cli("submit", str(specs[i % studies]), "--store", str(root), runlog=runlog) for i in range(4)]
    outputs = [finish(p) for p in procs]
    assert torn_versions(root) == []
    counted = runs(runlog)
    assert sorted(counted) == sorted(f"{s}[language={lang}]" for s in ("tokens", "follow") for lang in ("en", "de", "fr"))
    assert set(counted.values()) == {1}, counted  # no job ran twice
    assert all("study lin" in o for o in outputs)
    store = open_store(root)
    assert all(len(store.versions(n)) == 1 for n in store.names())


def test_the_loser_of_a_race_waits_for_the_lock_and_reuses_the_result(tmp_path: Path) -> None:
    """A second run of a key that is running says who holds the lock, waits, and runs nothing."""
    root, runlog = tmp_path / "root", tmp_path / "runs.log"
    spec = write_spec(tmp_path, sleep=1.0, text=UPSTREAM_ONLY)
    study, registry = load_study(spec, [f"storage.root={root}"])
    plan = build_plan(study, registry)
    paths = StudyPaths(root, study.name)
    job = plan.jobs[0]
    record = write_job_record(paths, JobRecord.from_job(job, plan, root))
    first = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run-job", str(record)], env={**os.environ, "TOYSTAGES_RUNLOG": str(runlog)}
    )
    deadline = time.monotonic() + 30
    while not runlog.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    second = cli("run-job", str(record), runlog=runlog)
    out = finish(second)
    assert first.wait(timeout=60) == 0
    assert "another run of this job" in out and "waiting" in out
    assert "outputs already committed; nothing to do" in out
    assert runs(runlog) == Counter({job.label: 1})


def test_forced_upstream_makes_downstream_stale_and_says_why(tmp_path: Path) -> None:
    """A nondeterministic upstream rerun with --force (here by a spec of the upstream stage alone,
    as a second study or a partial resubmit would) commits v1; the downstream results built from
    v0 are no longer cached: plan says why, submit reruns exactly them, lineage names v1."""
    root, runlog = tmp_path / "root", tmp_path / "runs.log"
    full = write_spec(tmp_path)
    finish(cli("submit", str(full), "--store", str(root), runlog=runlog))
    finish(cli("submit", str(write_spec(tmp_path, text=UPSTREAM_ONLY)), "--store", str(root), "--force", runlog=runlog))

    plan_out = finish(cli("plan", str(full), "--store", str(root)))
    assert plan_out.count("stale: input src is lin.tokens.a.language-") == 3, plan_out
    assert "was built from v0" in plan_out and "3 cached" in plan_out

    before = runs(runlog)
    out = finish(cli("submit", str(full), "--store", str(root), runlog=runlog))
    assert "rerun follow[language=en]: stale: input src is lin.tokens.a.language-en:v1, was built from v0" in out
    ran = runs(runlog) - before
    assert sorted(ran) == ["follow[language=de]", "follow[language=en]", "follow[language=fr]"]

    store = open_store(root)
    study, registry = load_study(full, [f"storage.root={root}"])
    for job in build_plan(study, registry).stage_jobs("follow"):
        out_ref = store.job_outputs(job.key)["a"]
        upstream = store.job_outputs(job.deps[0])["a"]
        assert upstream.version == 1
        assert store.get(out_ref).producer.inputs == (upstream,)  # lineage = what the bytes came from
        assert store.job_record(job.key).inputs == {"src": (upstream,)}
    assert "0 to run" in finish(cli("plan", str(full), "--store", str(root)))


def test_a_force_in_another_study_is_never_silent(tmp_path: Path) -> None:
    """Study B shares study A's upstream jobs and reruns them with --force: A's cached downstream
    results are not passed off as current; A's next plan names the changed inputs."""
    root = tmp_path / "root"
    a = write_spec(tmp_path, "a")
    finish(cli("submit", str(a), "--store", str(root)))
    finish(cli("submit", str(write_spec(tmp_path, "b", text=UPSTREAM_ONLY)), "--store", str(root), "--force"))
    plan_out = finish(cli("plan", str(a), "--store", str(root)))
    assert plan_out.count("stale: input src is b.tokens.a.language-") == 3, plan_out


def test_a_late_writer_cannot_change_a_committed_output(tmp_path: Path) -> None:
    """A stage whose thread rewrites an output after the stage returned: the output is hashed only
    after the stage process is gone, so the committed version and its blobs hold what the stage
    had written when it returned."""
    root = tmp_path / "root"
    spec = write_spec(tmp_path, text=UPSTREAM_ONLY.replace("sleep_s: {sleep}", "sleep_s: 0, late_write_s: 0.3"))
    finish(cli("submit", str(spec), "--store", str(root)))
    time.sleep(0.6)  # the late write would have happened by now
    assert torn_versions(root) == []
    fsck = subprocess.run([sys.executable, "-m", "orchestrator", "fsck", "--store", str(root)], capture_output=True, text=True)
    assert fsck.returncode == 0 and "store ok" in fsck.stdout, fsck.stdout + fsck.stderr


def test_a_stage_that_writes_to_its_input_fails_and_the_store_keeps_the_committed_bytes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = write_spec(tmp_path)
    study, registry = load_study(spec, [f"storage.root={root}", "stages.follow.params.write_input=true"])
    plan = build_plan(study, registry)
    paths = StudyPaths(root, study.name)
    store = open_store(root)
    for job in plan.stage_jobs("tokens"):
        assert run_job(write_job_record(paths, JobRecord.from_job(job, plan, root))) == 0
    job = plan.stage_jobs("follow")[0]
    log = tmp_path / "follow.log"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run-job", str(write_job_record(paths, JobRecord.from_job(job, plan, root)))],
        capture_output=True,
        text=True,
    )
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == EXIT_FAILED, log.read_text()
    assert "wrote to its input" in proc.stdout
    assert store.job_record(job.key) is None
    upstream: ArtifactRef = store.job_outputs(job.deps[0])["a"]
    assert "VANDAL" not in (store.materialize(upstream) / "part0.json").read_text()  # the view is rebuilt from the blob
    assert torn_versions(root) == []
    fsck = subprocess.run([sys.executable, "-m", "orchestrator", "fsck", "--store", str(root)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_fsck_removes_the_staging_folders_of_dead_attempts_but_not_of_running_ones(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = write_spec(tmp_path, text=UPSTREAM_ONLY)
    finish(cli("submit", str(spec), "--store", str(root)))
    dead = root / "staging" / ("a" * 64) / "host-1-dead"
    dead.mkdir(parents=True)
    (dead / "half-written.bin").write_bytes(b"x")
    running = root / "staging" / ("b" * 64) / "host-2-alive"
    running.mkdir(parents=True)
    holder = subprocess.Popen(  # a live run: holds its key's run lock
        [sys.executable, "-c", "import sys, time; from orchestrator.artifacts.locking import file_lock\n"
         f"with file_lock({str(root / 'locks' / ('b' * 64 + '.lock'))!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        out = finish(cli("fsck", "--store", str(root)))
    finally:
        holder.kill()
        holder.wait()
    assert f"STALE staging folder staging/{'a' * 64}/host-1-dead" in out and "store ok" in out
    assert not dead.exists() and running.exists()


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_consumer_never_reads_a_damaged_input_and_force_repairs_it(tmp_path: Path, damage: str) -> None:
    """A blob of an input goes bad after it was committed: the consumer fails in one line instead
    of reading it, and rerunning the (deterministic) producer with --force puts the blob back."""
    root = tmp_path / "root"
    spec = write_spec(
        tmp_path, text=SPEC.replace("params: {{sleep_s: {sleep}}}", "params: {{sleep_s: {sleep}, deterministic: true}}")
    )
    finish(cli("submit", str(spec), "--store", str(root)))
    store = open_store(root)
    study, registry = load_study(spec, [f"storage.root={root}"])
    follow = build_plan(study, registry).stage_jobs("follow")[0]
    version = store.get(store.job_outputs(follow.deps[0])["a"])
    sha = next(f.sha256 for f in version.files if f.path == "part0.json")
    blob = store.root / "objects" / sha[:2] / sha[2:]
    shutil.rmtree(store.root / "materialized")  # a consumer that has not read it yet
    if damage == "delete":
        blob.unlink()
    else:
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes().replace(b"1.0", b"7.0"))
    record = StudyPaths(root, study.name).job(follow.key).record
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run-job", str(record), "--force"], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "submit --force" in proc.stdout + proc.stderr
    finish(cli("submit", str(spec), "--store", str(root), "--force"))
    seen = json.loads((store.materialize(store.job_outputs(follow.key)["seen"]) / "src.json").read_text())
    assert seen["sha256"] == sha  # the consumer read exactly the manifest's bytes
    assert "store ok" in finish(cli("fsck", "--store", str(root)))


def test_the_stage_process_releases_what_its_libraries_hold(tmp_path: Path) -> None:
    """The stage process ends with multiprocessing's finalizers (not a bare _exit): a stage whose
    progress bar made a semaphore does not leave the submitter warning about leaked ones."""
    spec = write_spec(tmp_path, text=UPSTREAM_ONLY.replace("sleep_s: {sleep}", "sleep_s: 0, progress: true"))
    out = finish(cli("submit", str(spec), "--store", str(tmp_path / "root")))
    assert "leaked semaphore" not in out, out


def _count_job(tmp_path: Path, sleep_s: float) -> tuple[subprocess.Popen[str], Path]:
    """A started ``run-job`` of the toy checkpointing stage (a check for a stop request every
    ``sleep_s``), and its checkpoint folder."""
    root = tmp_path / "root"
    spec = tmp_path / "count.yaml"
    spec.write_text(
        f"name: count\nlanguages: [en]\nstage_package: toystages\nstages:\n  count: {{params: {{steps: 200, sleep_s: {sleep_s}}}}}\n"
    )
    study, registry = load_study(spec, [f"storage.root={root}"])
    plan = build_plan(study, registry)
    record = write_job_record(StudyPaths(root, study.name), JobRecord.from_job(plan.jobs[0], plan, root))
    proc = cli("run-job", str(record))
    assert proc.stdout is not None and "running stage count" in proc.stdout.readline()
    return proc, StudyPaths(root, study.name).job(plan.jobs[0].key).checkpoint


def test_a_barrage_of_stop_signals_never_kills_the_runner_before_it_reports(tmp_path: Path) -> None:
    """scancel signals every process of a job and the batch shell passes the signal on again: the
    runner gets several TERMs, some after its stage process has ended. It must still exit 3 (the
    stage checkpointed), never die of the signal with nothing recorded."""
    proc, checkpoint = _count_job(tmp_path, sleep_s=0.05)
    time.sleep(0.3)
    deadline = time.monotonic() + 3
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == EXIT_INTERRUPTED, f"exit {proc.returncode}\n{out}"
    assert (checkpoint / "state.json").exists()


def test_a_burst_of_stop_signals_is_one_request_to_checkpoint(tmp_path: Path) -> None:
    """One scancel reaches a stage several times within milliseconds (from slurmstepd, and passed
    on by the batch shell and the runner): the stage must still be given its checkpoint, however
    many of them land before its next look at ``stop_requested``."""
    proc, checkpoint = _count_job(tmp_path, sleep_s=1.0)
    time.sleep(0.2)
    for _ in range(20):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_INTERRUPTED, f"exit {proc.returncode}\n{out}"
    assert (checkpoint / "state.json").exists()


def test_a_stop_signal_after_the_repeat_window_stops_the_stage_at_once(tmp_path: Path) -> None:
    """A stop signal that comes later than ``REPEAT_WINDOW_S`` after the first is a second
    request: a stage that has not checkpointed by then is stopped at once, with nothing committed."""
    proc, checkpoint = _count_job(tmp_path, sleep_s=60.0)
    while not (checkpoint / "in_step").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(REPEAT_WINDOW_S + 0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == EXIT_ABORTED, f"exit {proc.returncode}\n{out}"
    assert "without a checkpoint" in out and not (checkpoint / "state.json").exists()


# A SLURM task's runner with a TERM arriving at the worst moment: right after it recorded "running".
TERM_AFTER_RUNNING = """\
import os, signal, sys
from orchestrator.executors.slurm import job as runner  # the array task's side of run-job
from orchestrator.cli import main
written = runner.write_state
def write_state(paths, key, state, **fields):
    written(paths, key, state, **fields)
    if state == "running":
        os.kill(os.getpid(), signal.SIGTERM)
runner.write_state = write_state
sys.exit(main(sys.argv[1:]))
"""


def test_a_task_stopped_just_after_it_recorded_running_records_how_it_ended(tmp_path: Path) -> None:
    """From the moment a SLURM task records "running", its stop signals are the runner's: a TERM
    then (scancel of a task that has just started) ends it as interrupted, never as death by
    signal that leaves "running" on record for a job that no longer exists."""
    root = tmp_path / "root"
    spec = tmp_path / "count.yaml"
    spec.write_text("name: count\nlanguages: [en]\nstage_package: toystages\nstages:\n  count: {params: {steps: 5}}\n")
    study, registry = load_study(spec, [f"storage.root={root}"])
    plan = build_plan(study, registry)
    paths = StudyPaths(root, study.name)
    record = write_job_record(paths, JobRecord.from_job(plan.jobs[0], plan, root))
    (tmp_path / "tasks.json").write_text(json.dumps([str(record)]))
    args = ["run-job", "--list", str(tmp_path / "tasks.json"), "--index", "0"]
    proc = subprocess.run([sys.executable, "-c", TERM_AFTER_RUNNING, *args], capture_output=True, text=True, timeout=120)
    state = json.loads((paths.job(plan.jobs[0].key).dir / "state.json").read_text())
    assert (proc.returncode, state["state"]) == (3, "interrupted"), proc.stdout + proc.stderr
    assert open_store(root).job_outputs(plan.jobs[0].key) is None  # stopped before the stage ran
