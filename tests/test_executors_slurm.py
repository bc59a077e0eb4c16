"""The SLURM executor: pure rendering (golden file, quoting) and a real single-node cluster.

The cluster tests need slurmctld/slurmd running (`.ci/run` starts them with
scripts/slurm/start-local-slurm.sh). Without SLURM they are skipped, unless REQUIRE_SLURM=1 (as in
CI), where a missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TOY_SPEC

from orchestrator.artifacts import LocalStore
from orchestrator.errors import OrchestratorError
from orchestrator.executors.slurm import (
    DEFAULT_TEMPLATE,
    Dep,
    Submission,
    dependency_arg,
    render_command,
    render_directives,
    render_script,
    sbatch_options,
    submitted_ids,
)
from orchestrator.paths import StudyPaths
from orchestrator.spec import Resources

GOLDEN = Path(__file__).parent / "golden" / "slurm_array.sbatch"
HAVE_SLURM = shutil.which("sbatch") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0
cluster = pytest.mark.skipif(not HAVE_SLURM and not os.environ.get("REQUIRE_SLURM"), reason="no SLURM cluster here")
ODD = 'it\'s "odd" $(touch /tmp/xls-pwned) `id` ; rm -rf ~ \n second line $HOME'


def golden_script() -> str:
    sub = Submission(
        "prune",
        ((0, "a"), (1, "b"), (4, "c")),
        (Dep(0, corr=True), Dep(1)),
        Resources(cpus=4, mem_gb=16, time_min=90, gpus=1, partition="gpu", account="proj x", extra={"mail-type": "FAIL"}),
        array=True,
    )
    opts = sbatch_options(sub, "demo", Path("/scratch/my study/slurm"), parallelism=2)
    return render_script(
        DEFAULT_TEMPLATE.read_text(),
        directives=render_directives(opts),
        study="demo",
        stage="prune",
        workdir=Path("/home/me/it's here"),
        command=render_command("/opt/py env/bin/python", Path("/scratch/my study/01-prune.jobs.json")),
    )


def test_rendered_script_matches_golden_file() -> None:
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(golden_script())
    assert golden_script() == GOLDEN.read_text()


def test_directive_values_are_quoted_and_line_breaks_refused() -> None:
    text = render_directives({"job_name": "a b'c", "comment": "$(rm -rf /)"})
    assert "#SBATCH --job-name            'a b'\"'\"'c'" in text
    assert "#SBATCH --comment             '$(rm -rf /)'" in text
    with pytest.raises(OrchestratorError, match="line break"):
        render_directives({"job_name": "a\nrm -rf /"})
    with pytest.raises(OrchestratorError, match="unknown sbatch option"):
        render_directives({"not_an_option": "1"})


def test_template_placeholders() -> None:
    with pytest.raises(OrchestratorError, match="no {{command}} placeholder"):
        render_script("{{directives}}", directives="", study="s", stage="t", workdir=Path("/"), command="x")
    with pytest.raises(OrchestratorError, match=r"unknown placeholder \{\{modules\}\}"):
        render_script("{{directives}}{{modules}}{{command}}", directives="", study="s", stage="t", workdir=Path("/"), command="")
    # a value containing {{...}} is never expanded again
    out = render_script(
        "{{directives}}\n{{command}}",
        directives="#SBATCH --comment '{{command}}'",
        study="s",
        stage="t",
        workdir=Path("/"),
        command="run",
    )
    assert out == "#SBATCH --comment '{{command}}'\nrun"


def test_dependency_argument_for_several_conditions() -> None:
    conditions = [Dep(0).render("12"), Dep(1, (2, 5)).render("14"), Dep(2, corr=True).render("15")]
    assert dependency_arg(conditions) == ["--dependency=afterok:12,afterok:14_2:14_5,aftercorr:15"]
    assert dependency_arg([]) == []


# ---------------------------------------------------------------- real cluster


def submit(spec: Path, store: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--executor", "slurm", "--store", str(store), *args],
        cwd=spec.parent,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def states(store: Path, study: str) -> dict[str, str]:
    jobs = store / "studies" / study / "jobs"
    plan = json.loads((store / "studies" / study / "plan.json").read_text())
    out = {}
    for job in plan["jobs"]:
        path = jobs / job["key"] / "state.json"
        out[job["label"]] = json.loads(path.read_text())["state"] if path.exists() else "none"
    return out


def wait_until_done(
    store: Path,
    study: str,
    timeout_s: float = 120,
    transient: frozenset[str] = frozenset({"queued", "running", "pending", "interrupted"}),
) -> dict[str, str]:
    """Poll `status` (real squeue/sacct) until no job is in a ``transient`` state (by default
    queued or running, or interrupted: a checkpointed job requeues itself)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", "status", study, "--store", str(store)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        table = out.stdout.split("\n\n")[0]  # the failed jobs' last errors follow, after a blank line
        rows = {ln.split()[0]: ln.split()[1] for ln in table.splitlines()[3:] if ln.strip()}
        if rows and not transient & set(rows.values()):
            return rows
        time.sleep(1)
    raise AssertionError(f"study {study} did not finish: {states(store, study)}")


def value(store: Path, study: str, label: str) -> dict[str, object]:
    """The value.json a toy job committed, read through the store like a downstream job would."""
    artifacts = LocalStore(store / "artifacts")
    key = _job_dir(store, study, label).name
    (ref,) = artifacts.job_outputs(key).values()
    return json.loads((artifacts.materialize(ref) / "value.json").read_text())


@pytest.fixture
def odd_dir(tmp_path: Path) -> Path:
    """A work folder whose name has spaces and quotes, to catch quoting bugs."""
    d = tmp_path / 'my study\'s "dir"'
    d.mkdir()
    return d


@cluster
def test_real_cluster_runs_study_with_arrays_and_dependencies(odd_dir: Path) -> None:
    spec = odd_dir / "toy.yaml"
    spec.write_text(TOY_SPEC)
    store = odd_dir / "store $(x)"
    out = submit(spec, store)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "queued 7 jobs in 3 sbatch submissions" in out.stdout
    assert "sbatch scale: job" in out.stdout and "after" in out.stdout
    final = wait_until_done(store, "toy")
    assert set(final.values()) == {"succeeded"}, final
    subs = json.loads(next((store / "studies" / "toy" / "slurm").glob("*/submission.json")).read_text())["submissions"]
    assert [s["stage"] for s in subs] == ["emit", "scale", "total"]
    assert [s["after"] for s in subs] == [[], ["aftercorr:<emit>"], ["afterok:<scale>"]]  # scale[x] waits for emit[x] only
    assert len(subs[0]["tasks"]) == 3  # one array of 3, not 3 sbatch calls
    # dependency order: each scale job started after its own emit job, total after every scale job
    metrics = {lbl: _first_metric_time(store, "toy", lbl) for lbl in final}
    assert all(metrics[f"scale[language={x}]"] > metrics[f"emit[language={x}]"] for x in ["en", "de", "fr"])
    assert metrics["total"] > max(metrics[f"scale[language={x}]"] for x in ["en", "de", "fr"])
    again = submit(spec, store)
    assert "7 of 7 jobs cached" in again.stdout and "nothing to submit" in again.stdout


def _job_dir(store: Path, study: str, label: str) -> Path:
    plan = json.loads((store / "studies" / study / "plan.json").read_text())
    key = next(j["key"] for j in plan["jobs"] if j["label"] == label)
    return store / "studies" / study / "jobs" / key


def _first_metric_time(store: Path, study: str, label: str) -> float:
    return json.loads((_job_dir(store, study, label) / "metrics.jsonl").read_text().splitlines()[0])["time"]


@cluster
def test_real_cluster_failed_job_cancels_dependents_and_resubmit_runs_only_missing(odd_dir: Path) -> None:
    spec = odd_dir / "toy.yaml"
    spec.write_text(TOY_SPEC)
    store = odd_dir / "store"
    out = submit(spec, store, env={"TOYSTAGES_FAIL": "de"})
    assert out.returncode == 0, out.stderr
    final = wait_until_done(store, "toy")
    assert final["scale[language=de]"] == "failed"
    assert final["total"] == "cancelled"  # --kill-on-invalid-dep: not left pending forever
    assert final["scale[language=en]"] == "succeeded"
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", "toy", "--store", str(store)], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert "DependencyNeverSatisfied" in status or "CANCELLED" in status
    row = next(ln for ln in status.splitlines() if ln.startswith("scale[language=de]"))
    log = _job_dir(store, "toy", "scale[language=de]") / "job.log"
    assert str(log) in row
    assert "scale failed on purpose for de" in log.read_text()
    again = submit(spec, store)
    assert "5 of 7 jobs cached" in again.stdout and "queued 2 jobs in 2 sbatch submissions" in again.stdout
    final = wait_until_done(store, "toy")
    assert final["scale[language=de]"] == final["total"] == "succeeded"
    assert final["scale[language=en]"] == "cached"


@cluster
def test_real_cluster_spec_values_run_exactly_as_written(odd_dir: Path) -> None:
    spec = odd_dir / "odd.yaml"
    spec.write_text(
        "name: odd\nlanguages: [en]\nstage_package: toystages\nstages:\n  emit:\n"
        f"    params: {{language: {json.dumps(ODD)}}}\n"
        f"executor: {{resources: {{default: {{extra: {{comment: {json.dumps(ODD.replace(chr(10), ' '))}}}}}}}}}\n"
    )
    store = odd_dir / "store"
    Path("/tmp/xls-pwned").unlink(missing_ok=True)
    out = submit(spec, store)
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(wait_until_done(store, "odd").values()) == {"succeeded"}
    assert value(store, "odd", "emit")["language"] == ODD
    assert not Path("/tmp/xls-pwned").exists()


@cluster
def test_failed_sbatch_reports_stderr_and_cancels_what_it_queued(odd_dir: Path) -> None:
    spec = odd_dir / "toy.yaml"
    spec.write_text(TOY_SPEC)
    store = odd_dir / "store"
    out = submit(spec, store, "--set", "executor.resources.total.partition=no-such-partition")
    assert out.returncode == 1
    assert "sbatch failed for stage 'total'" in out.stderr and "invalid partition" in out.stderr.lower()
    assert "cancelled the 2 submissions already queued" in out.stderr
    ids = ",".join(submitted_ids(StudyPaths(store, "toy")))
    time.sleep(1)
    queued = subprocess.run(["squeue", "-h", "-j", ids, "-t", "PENDING,RUNNING"], capture_output=True, text=True).stdout
    assert queued.strip() == ""


@cluster
def test_cancel_command(odd_dir: Path) -> None:
    spec = odd_dir / "slow.yaml"
    spec.write_text(
        "name: slow\nlanguages: [en]\nstage_package: toystages\nstages:\n  count: {params: {steps: 100, sleep_s: 1}}\n"
    )
    store = odd_dir / "store"
    assert submit(spec, store).returncode == 0
    deadline = time.monotonic() + 60  # cancel it running: a job that checkpoints must not requeue itself
    while "running" not in states(store, "slow").values() and time.monotonic() < deadline:
        time.sleep(0.2)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "cancel", "slow", "--store", str(store)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "cancelled SLURM jobs" in out.stdout
    final = wait_until_done(store, "slow", transient=frozenset({"queued", "running", "pending"}))
    assert set(final.values()) <= {"cancelled", "interrupted", "failed"}
    time.sleep(3)  # a job that requeued itself after the TERM would be back in the queue by now
    ids = ",".join(submitted_ids(StudyPaths(store, "slow")))
    queued = subprocess.run(["squeue", "-h", "-j", ids], capture_output=True, text=True).stdout
    assert queued.strip() == "" and states(store, "slow") == final


@cluster
def test_preempted_job_checkpoints_requeues_and_resumes(odd_dir: Path) -> None:
    spec = odd_dir / "count.yaml"
    spec.write_text(
        "name: count\nlanguages: [en]\nstage_package: toystages\nstages:\n  count: {params: {steps: 8, sleep_s: 0.5}}\n"
    )
    store = odd_dir / "store"
    assert submit(spec, store).returncode == 0
    (job_id,) = submitted_ids(StudyPaths(store, "count"))
    deadline = time.monotonic() + 30
    while states(store, "count")["count"] != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    # what SLURM does --signal=B:USR2@120 before the time limit
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    final = wait_until_done(store, "count", timeout_s=90)
    assert final["count"] == "succeeded"
    result = value(store, "count", "count")
    assert result["value"] == 8 and result["starts"] == 2  # resumed once, ended at the same step count


def _time_limit_signal(store: Path, study: str, label: str) -> None:
    """Wait until ``label`` runs, then do what SLURM does signal_lead_s before the time limit."""
    deadline = time.monotonic() + 60
    while states(store, study)[label] != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    job_id = json.loads(_state_path(store, study, label).read_text())["external_id"]
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id.split("_")[0]], check=True)


def _state_path(store: Path, study: str, label: str) -> Path:
    return _job_dir(store, study, label) / "state.json"


def _restarts(job_id: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(r"Restarts=(\d+)", out)
    return int(match.group(1)) if match else -1


@cluster
def test_a_stage_that_cannot_checkpoint_is_not_requeued_at_its_time_limit(odd_dir: Path) -> None:
    """USR2 before the time limit, to a stage that does not checkpoint: requeueing would run it from
    the start into the same limit, forever. It ends as timeout, saying to raise time_min."""
    spec = odd_dir / "slow.yaml"
    spec.write_text("name: slow\nlanguages: [en]\nstage_package: toystages\nstages:\n  emit: {params: {sleep_s: 60}}\n")
    store = odd_dir / "store"
    assert submit(spec, store).returncode == 0
    _time_limit_signal(store, "slow", "emit")
    final = wait_until_done(store, "slow", timeout_s=60)
    state = json.loads(_state_path(store, "slow", "emit").read_text())
    assert (final["emit"], state["state"]) == ("timeout", "timeout"), state
    assert "time_min" in state["message"] and "does not checkpoint" in state["message"]
    time.sleep(2)  # a requeued job would be back in the queue by now
    assert _restarts(state["external_id"]) in (0, -1)  # -1: already purged from slurmctld, never requeued
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", "slow", "--store", str(store)], capture_output=True, text=True, cwd=ROOT
    )
    assert "timeout" in status.stdout


@cluster
def test_a_checkpointing_stage_requeues_at_most_max_requeues_times(odd_dir: Path) -> None:
    """A stage that checkpoints at every time limit but never finishes in time: requeued up to
    max_requeues, then timeout with a message, instead of crawling through requeues forever."""
    spec = odd_dir / "count.yaml"
    spec.write_text(
        "name: count\nlanguages: [en]\nstage_package: toystages\n"
        "executor: {backend: slurm, resources: {count: {max_requeues: 1}}}\n"
        "stages:\n  count: {params: {steps: 200, sleep_s: 0.5}}\n"
    )
    store = odd_dir / "store"
    assert submit(spec, store).returncode == 0
    _time_limit_signal(store, "count", "count")  # the first limit: checkpoint, requeue (restart 1 of 1)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = json.loads(_state_path(store, "count", "count").read_text())
        if state["state"] == "running" and _restarts(state["external_id"]) == 1:
            break
        time.sleep(0.5)
    _time_limit_signal(store, "count", "count")  # the second: no requeue left
    final = wait_until_done(store, "count", timeout_s=60)
    state = json.loads(_state_path(store, "count", "count").read_text())
    assert (final["count"], state["state"]) == ("timeout", "timeout"), state
    assert "max_requeues" in state["message"] and "time_min" in state["message"]
    time.sleep(2)
    assert _restarts(state["external_id"]) in (1, -1)


def test_a_task_exits_3_only_where_a_requeue_resumes_and_requeues_are_left() -> None:
    """The batch script requeues on exit 3 after USR2: the runner keeps 3 only for a checkpoint (or
    a stage that never started) with requeues left; everything else is final, with what to do."""
    from orchestrator.executors.slurm.job import task_outcome
    from orchestrator.exitcodes import EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TIMEOUT

    assert task_outcome(EXIT_OK, True, 0, 3, "train") == ("succeeded", EXIT_OK, None)
    assert task_outcome(EXIT_FAILED, True, 0, 3, "train")[:2] == ("failed", EXIT_FAILED)
    assert task_outcome(EXIT_ABORTED, False, 0, 3, "emit") == ("interrupted", EXIT_ABORTED, None)  # scancel: no time limit
    state, rc, message = task_outcome(EXIT_ABORTED, True, 0, 3, "emit")
    assert (state, rc) == ("timeout", EXIT_ABORTED) and "does not checkpoint" in str(message)
    assert "executor.resources.emit.time_min" in str(message)
    state, rc, message = task_outcome(EXIT_INTERRUPTED, True, 2, 3, "train")
    assert (state, rc) == ("interrupted", EXIT_INTERRUPTED) and "requeue 3 of 3" in str(message)
    state, rc, message = task_outcome(EXIT_INTERRUPTED, True, 3, 3, "train")
    assert (state, rc) == ("timeout", EXIT_TIMEOUT) and "max_requeues (3)" in str(message)
    assert task_outcome(EXIT_INTERRUPTED, True, 0, 0, "train")[:2] == ("timeout", EXIT_TIMEOUT)  # requeues off


def test_a_time_limit_within_the_checkpoint_signal_lead_is_refused_on_slurm(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: s\nlanguages: [en]\nstage_package: toystages\n"
        "executor: {backend: slurm, resources: {default: {time_min: 2, signal_lead_s: 120}}}\n"
        "stages:\n  emit: {}\n"
    )
    out = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(spec)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "time_min (2 min) must be longer than signal_lead_s (120 s)" in out.stderr
    assert "Traceback" not in out.stderr
    local = subprocess.run(  # the local executor has no such signal: the same limits are fine there
        [sys.executable, "-m", "orchestrator", "validate", str(spec), "--executor", "local"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert local.returncode == 0, local.stderr
    sub = Submission("emit", ((0, "a"),), (), Resources(time_min=10, signal_lead_s=300, max_requeues=1), array=False)
    assert sbatch_options(sub, "s", tmp_path)["signal"] == "B:USR2@300"
    assert "--max-requeues 1 " in render_command("python", tmp_path / "l.json", 1)


@cluster
def test_submits_of_a_study_whose_jobs_are_still_queued_are_refused_and_nothing_runs_twice(odd_dir: Path) -> None:
    """Two submits of one study at once, then one more while its job runs: the first queues, the
    others are refused with what to do (they used to queue every job again, into the same
    one-second submission folder, and the jobs ran twice)."""
    spec = odd_dir / "twice.yaml"
    spec.write_text("name: twice\nlanguages: [en]\nstage_package: toystages\nstages:\n  emit: {params: {sleep_s: 8}}\n")
    store = odd_dir / "store"
    cmd = [sys.executable, "-m", "orchestrator", "submit", str(spec), "--executor", "slurm", "--store", str(store)]
    procs = [subprocess.Popen(cmd, cwd=odd_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 1], results
    refused = next(err for rc, _, err in results if rc == 1)
    assert "still queued or running" in refused and "orchestrator cancel twice" in refused and "Traceback" not in refused
    again = submit(spec, store)
    assert again.returncode == 1 and "still queued or running" in again.stderr
    final = wait_until_done(store, "twice", timeout_s=90)
    assert final == {"emit": "succeeded"}
    log = (_job_dir(store, "twice", "emit") / "job.log").read_text()
    assert log.count("running stage emit") == 1  # one run, not two
    assert len(list((store / "studies" / "twice" / "slurm").glob("*/submission.json"))) == 1
    assert submit(spec, store).returncode == 0  # once nothing is queued, a resubmit is fine (all cached)


@cluster
def test_slurm_jobs_get_their_cpus_as_thread_counts_and_keep_their_output_across_requeues(odd_dir: Path) -> None:
    """As the local executor does: a job's thread pools are sized by its cpus (cpus-per-task), not
    by every core of the node; SLURM's own output file is appended to, so a requeue keeps it."""
    spec = odd_dir / "threads.yaml"
    spec.write_text(
        "name: threads\nlanguages: [en]\nstage_package: toystages\n"
        "executor: {backend: slurm, resources: {emit: {cpus: 2}}}\nstages:\n  emit: {}\n"
    )
    store = odd_dir / "store"
    assert submit(spec, store).returncode == 0
    assert wait_until_done(store, "threads") == {"emit": "succeeded"}
    assert value(store, "threads", "emit")["threads"] == "2"
    script = next((store / "studies" / "threads" / "slurm").glob("*/000-emit.sbatch")).read_text()
    assert "#SBATCH --open-mode           append" in script


@cluster
def test_failed_slurm_jobs_are_retried_inside_their_allocation(odd_dir: Path) -> None:
    """resources.retries on SLURM: the runner runs a failed attempt again within the same task
    (no requeue, no new sbatch); a job that fails twice succeeds on its third attempt, one that
    always fails ends failed after retries + 1 attempts, and each state records its attempts.
    The runner's own state records are polled (not `status`, whose scheduler query this is not about)."""
    from orchestrator.views import status_table

    spec = odd_dir / "flaky.yaml"
    spec.write_text(
        "name: flaky\nlanguages: [en]\nstage_package: toystages\n"
        "executor: {backend: slurm, resources: {flaky: {retries: 2, retry_backoff_s: 0.2}}}\n"
        "stages:\n  flaky: {matrix: {fail_times: [2, -1]}}\n"
    )
    store = odd_dir / "store"
    out = submit(spec, store)
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 120
    while {"none", "queued", "running"} & set((final := states(store, "flaky")).values()):
        assert time.monotonic() < deadline, final
        time.sleep(0.5)
    assert final == {"flaky[fail_times=2]": "succeeded", "flaky[fail_times=-1]": "failed"}, final
    for label, state in final.items():
        record = json.loads(_state_path(store, "flaky", label).read_text())
        assert record["state"] == state and record["executor"] == "slurm" and record["attempt"] == 3, record
        log = (_job_dir(store, "flaky", label) / "job.log").read_text()
        assert log.count("running stage flaky") == 3
        assert "attempt 3 of 3 in 0.4 s (attempt 2 failed: RuntimeError: flaky failed on purpose (run 2))" in log
    assert value(store, "flaky", "flaky[fail_times=2]")["value"] == 3  # the run that succeeded
    status = status_table(StudyPaths(store, "flaky"))
    assert "succeeded (3 attempts)" in status and "failed (3 attempts)" in status, status


def test_status_query_degrades_without_accounting() -> None:
    """sacct without accounting exits 1: finished jobs are then simply absent (the runner's own state
    records cover them). The commands are faked here only to pin the parsing of both outputs."""
    from orchestrator.executors.slurm import query_states

    def fake(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        if cmd[0] == "squeue":
            return subprocess.CompletedProcess(
                cmd, 0, "7_0|PENDING|Dependency\n7_1|RUNNING|None\n8|PENDING|DependencyNeverSatisfied\n", ""
            )
        return subprocess.CompletedProcess(cmd, 1, "", "Slurm accounting storage is disabled")

    assert query_states(["7_0", "7_1", "8"], run=fake).states == {
        "7_0": ("PENDING", "Dependency"),
        "7_1": ("RUNNING", ""),
        "8": ("PENDING", "DependencyNeverSatisfied"),
    }


@cluster
def test_real_cluster_runs_a_sweep_with_shared_upstream(odd_dir: Path) -> None:
    spec = odd_dir / "sweep.yaml"
    spec.write_text(
        TOY_SPEC.replace(
            "stage_package:", "  summary:\n    stage: total\n    collect: [factor]\n    inputs: {numbers: scale}\nstage_package:"
        )
        + "sweep:\n  method: grid\n  parameters:\n    scale.factor: {values: [2, 3]}\n"
    )
    store = odd_dir / "store"
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec), "--executor", "slurm", "--store", str(store)],
        cwd=spec.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "jobs per stage: emit 3, scale 6, total 2, summary 1" in out.stdout
    assert "queued 12 jobs in 6 sbatch submissions" in out.stdout  # emit, scale x2 (one per factor), total x2, summary
    final = wait_until_done(store, "toy")
    assert set(final.values()) == {"succeeded"} and len(final) == 12
    assert value(store, "toy", "total[factor=3]")["value"] == 27
    assert value(store, "toy", "summary")["value"] == 18 + 27 and value(store, "toy", "summary")["parts"] == 6


@cluster
def test_slurm_and_local_submits_of_one_study_run_each_job_once(odd_dir: Path) -> None:
    """The run lock holds across executors: the same study queued on SLURM and run locally at
    the same time runs each job's stage once in all, and no version is torn."""
    from test_lineage import SPEC, runs, torn_versions

    spec = odd_dir / "lin.yaml"
    spec.write_text(SPEC.format(name="lin", sleep=0.5))
    store, runlog = odd_dir / "store", odd_dir / "runs.log"
    env = {"TOYSTAGES_RUNLOG": str(runlog)}
    queued = submit(spec, store, env=env)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    ids = ",".join(submitted_ids(StudyPaths(store, "lin")))
    local = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--executor", "local", "--store", str(store)],
        cwd=odd_dir, capture_output=True, text=True, env={**os.environ, **env}, timeout=120,
    )  # fmt: skip
    assert local.returncode == 0, local.stdout + local.stderr
    deadline = time.monotonic() + 120
    while subprocess.run(["squeue", "-h", "-j", ids], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the SLURM jobs did not finish"
        time.sleep(1)
    counted = runs(runlog)
    assert len(counted) == 6 and set(counted.values()) == {1}, counted
    assert torn_versions(store) == []


# ------------------------------------------------------------------ cluster scale (issue 14, points 2, 3, 8)
def _local_states(spec: Path, store: Path, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--executor", "local", "--store", str(store)],
        cwd=spec.parent, capture_output=True, text=True, env={**os.environ, **env}, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    return states(store, spec.stem)


@cluster
def test_a_failed_job_cancels_only_its_own_dependents_as_the_local_executor_skips_them(odd_dir: Path) -> None:
    """emit -> scale -> again, per language, -> total: scale[de] fails. Every job of another
    language still runs on SLURM (before: the whole of `again` was cancelled with it)."""
    from test_slurm_layout import CHAIN

    spec = odd_dir / "chain.yaml"
    spec.write_text(CHAIN.replace("name: toy", "name: chain"))
    env = {"TOYSTAGES_FAIL": "de"}
    out = submit(spec, odd_dir / "slurm-store", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    on_slurm = wait_until_done(odd_dir / "slurm-store", "chain")
    local = _local_states(spec, odd_dir / "local-store", env)
    assert on_slurm["again[language=de]"] == "cancelled" and on_slurm["again[language=fr]"] == "succeeded"
    assert on_slurm == {label: {"skipped": "cancelled"}.get(state, state) for label, state in local.items()}


@cluster
def test_a_stage_bigger_than_max_array_size_is_split_and_throttled(odd_dir: Path) -> None:
    """MaxArraySize (1001 on the test cluster, SLURM's default) bounds array indices: a stage of
    1,002 jobs becomes two arrays instead of "Invalid job array specification". Queued held."""
    limit = int(re.search(r"MaxArraySize\s*=\s*(\d+)", subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout)[1])  # type: ignore[index]
    spec = odd_dir / "wide.yaml"
    spec.write_text(
        f"name: wide\nlanguages: [en]\nstage_package: toystages\nstages:\n  emit:\n    matrix: {{value: {list(range(limit + 1))}}}\n"
        "executor:\n  slurm: {array_parallelism: 7}\n  resources: {default: {extra: {hold: ''}}}\n"
    )
    store = odd_dir / "store"
    out = submit(spec, store)
    ids = submitted_ids(StudyPaths(store, "wide"))
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"queued {limit + 1} jobs in 2 sbatch submissions" in out.stdout
        tasks = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert len(tasks) == limit + 1
        shown = subprocess.run(["scontrol", "show", "job", ids[0]], capture_output=True, text=True).stdout
        assert "ArrayTaskThrottle=7" in shown
    finally:
        subprocess.run(["scancel", *ids], capture_output=True)


@cluster
def test_a_submit_that_would_overflow_max_job_count_is_refused_before_queuing(odd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue's real length (squeue) against a MaxJobCount set just above it (the test cluster's
    own, 10,000, cannot be reached in a test): nothing is queued, and the message says why."""
    from orchestrator.executors import slurm
    from orchestrator.plan import build_plan
    from orchestrator.runner import open_store
    from orchestrator.spec import load_study

    held = len(subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout.split())
    limit = min(held + 3, 70)  # the queue is counted for a submit of a tenth of MaxJobCount or more: 7 of 70
    monkeypatch.setattr(slurm, "cluster_limits", lambda run, timeout_s: slurm.ClusterLimits(max_job_count=limit))
    spec = odd_dir / "toy.yaml"
    spec.write_text(TOY_SPEC)
    study, registry = load_study(spec, [f"storage.root={odd_dir / 'store'}"])
    paths = StudyPaths((odd_dir / "store").resolve(), "toy")
    executor = slurm.SlurmExecutor(paths, open_store(paths.root), echo=lambda line: None)
    with pytest.raises(slurm.SlurmError, match=rf"queues 7 jobs, and the cluster holds at most MaxJobCount={limit} \(it holds \d+ now"):
        executor.submit(build_plan(study, registry), spec)
    assert submitted_ids(paths) == []


@pytest.fixture
def frozen_controller() -> object:
    """SIGSTOP slurmctld on demand (a controller that hangs: overloaded, or its node stuck), and
    SIGCONT it whatever happens."""
    pid = int(subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True, check=True).stdout.split()[0])

    class Freezer:
        def freeze(self) -> None:
            os.kill(pid, signal.SIGSTOP)

    try:
        yield Freezer()
    finally:
        os.kill(pid, signal.SIGCONT)


@cluster
def test_a_hung_controller_times_sbatch_out_and_status_warns_instead_of_hanging(
    odd_dir: Path, frozen_controller: Any
) -> None:
    from orchestrator.executors import slurm
    from orchestrator.plan import build_plan
    from orchestrator.runner import open_store
    from orchestrator.spec import load_study

    spec = odd_dir / "toy.yaml"
    spec.write_text(TOY_SPEC + "executor: {slurm: {sbatch_timeout_s: 2}, resources: {default: {extra: {hold: ''}}}}\n")
    queued = submit(spec, odd_dir / "queued")  # a study with jobs in the queue, for status
    assert queued.returncode == 0, queued.stdout + queued.stderr
    ids = submitted_ids(StudyPaths(odd_dir / "queued", "toy"))
    calls: list[str] = []

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if cmd[0] == "sbatch" and "sbatch" not in calls:
            frozen_controller.freeze()  # after the limits were read: the first sbatch meets a hung controller
        calls.append(cmd[0])
        return subprocess.run(cmd, **kw)

    study, registry = load_study(spec, [f"storage.root={odd_dir / 'store'}"])
    paths = StudyPaths((odd_dir / "store").resolve(), "toy")
    executor = slurm.SlurmExecutor(paths, open_store(paths.root), echo=lambda line: None, run=run)
    t0 = time.monotonic()
    with pytest.raises(slurm.SlurmError, match=r"sbatch failed for stage 'emit' did not return within 2 s \(executor.slurm.sbatch_timeout_s\)"):
        executor.submit(build_plan(study, registry), spec)
    assert time.monotonic() - t0 < 10 and submitted_ids(paths) == []
    t0 = time.monotonic()
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", "toy", "--store", str(odd_dir / "queued")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - t0
    os.kill(int(subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True).stdout.split()[0]), signal.SIGCONT)
    subprocess.run(["scancel", *ids], capture_output=True)
    assert status.returncode == 0 and took < 12, (took, status.stderr)
    assert "warning: the SLURM controller did not answer squeue within 5 s" in status.stderr
    assert re.search(r"^emit\[language=en\] +queued +- +slurm", status.stdout, re.MULTILINE)


@cluster
def test_status_shows_the_last_error_line_of_each_failed_job(odd_dir: Path) -> None:
    spec = odd_dir / "toy.yaml"
    spec.write_text(TOY_SPEC)
    store = odd_dir / "store"
    assert submit(spec, store, env={"TOYSTAGES_FAIL": "fr"}).returncode == 0
    wait_until_done(store, "toy")
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", "toy", "--store", str(store)], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert status.split("\n\n")[1].splitlines() == [
        "last error of each failed job:",
        "  scale[language=fr]: RuntimeError: scale failed on purpose for fr",
    ]
