"""Progress: ``ctx.progress`` from a stage to the job's ``progress.json`` and log (real runner, real
processes), the study-level ETA from stage history (pure functions), and what ``submit`` and
``status`` show of it through the real CLI (a pipe, a terminal, ``-q``)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from orchestrator.errors import BadArgument
from orchestrator.executors import LocalExecutor
from orchestrator.executors.local.live import INTERVAL_ENV, LiveView, Snapshot, interval_s
from orchestrator.paths import StudyPaths
from orchestrator.plan import build_plan
from orchestrator.progress import ProgressRecorder, ProgressSender, check_update, job_line, read_progress
from orchestrator.progress_study import Counts, Remaining, expected_seconds, stage_history, study_eta, summary_line
from orchestrator.runner import open_store
from orchestrator.spec import load_study

SPEC = """\
name: prog
languages: [en]
stage_package: progressstages
{executor}stages:
  steps:
    params: {params}
"""
LINE = re.compile(r"^steps: (\d+)/(\d+) (\w+) \(\d+%\)")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_spec(tmp_path: Path, params: str, executor: str = "") -> Path:
    spec = tmp_path / "prog.yaml"
    spec.write_text(SPEC.format(params=params, executor=executor))
    return spec


def cli(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def job_dir(root: Path) -> Path:
    (folder,) = (root / "studies" / "prog" / "jobs").iterdir()
    return folder


# ------------------------------------------------------------------------- the stage's side
def test_sender_thins_updates_sends_the_final_one_and_flushes_the_latest() -> None:
    sent: list[dict[str, object]] = []
    clock = Clock()
    sender = ProgressSender(sent.append, clock=clock)
    for i in range(50):  # a tight loop: 50 updates within 0.05 s
        sender.report(i, 100, "step")
        clock.now += 0.001
    assert [m["progress"]["done"] for m in sent] == [0]  # type: ignore[index]
    clock.now += 0.2
    sender.report(50, 100, "step")  # the interval has passed: sent
    sender.report(51, 100, "step")  # held back ...
    sender.report(0, 3, "batch")  # ... until a new phase starts: the held one goes first
    sender.report(3, 3, "batch")  # final: at once
    sender.report(1, 3, "batch")
    sender.flush()  # the stage returned: the latest goes out
    assert [tuple(m["progress"].values()) for m in sent][1:] == [  # type: ignore[attr-defined]
        (50, 100, "step"),
        (51, 100, "step"),
        (0, 3, "batch"),
        (3, 3, "batch"),
        (1, 3, "batch"),
    ]


def test_bad_progress_arguments_are_named() -> None:
    assert check_update(3, None, " step ") == (3, None, "step")
    for args in [(-1, 10, "step"), (1, -2, "step"), ("x", 10, "step"), (1, 10, "")]:
        with pytest.raises(ValueError, match=r"ctx.progress\("):
            check_update(*args)
    ProgressSender(None).report(1, 2)  # a rank other than 0: checked, dropped
    with pytest.raises(ValueError):
        ProgressSender(None).report(-1)


# ------------------------------------------------------------------------ the runner's side
def test_recorder_writes_the_file_at_most_once_a_second_and_one_log_line_per_update(tmp_path: Path) -> None:
    clock, lines = Clock(), []
    path = tmp_path / "progress.json"
    rec = ProgressRecorder(path, "prune[language=en]", "prune", echo=lines.append, clock=clock)
    rec.start()
    assert read_progress(tmp_path).done is None  # type: ignore[union-attr]
    for done in range(0, 801):
        rec.update({"done": done, "total": 800, "unit": "step"})
        if done == 121:
            assert read_progress(tmp_path).done == 96  # type: ignore[union-attr]  # written once a second: at 0, 32, 64, 96
            clock.now += 1.0
            rec.tick()  # the pipe was quiet: the held-back update is written
            assert read_progress(tmp_path).done == 121  # type: ignore[union-attr]
        clock.now += 0.03125  # 32 steps/s: a tenth of the total every 2.5 s
    rec.end(ok=True)
    # the first line, one at each tenth, the final one: one line per update, no carriage returns
    assert len(lines) == 11 and not any("\r" in line for line in lines)
    assert lines[0] == "prune[language=en]: 0/800 steps (0%)"
    assert re.fullmatch(r"prune\[language=en\]: 80/800 steps \(10%\), 32\.0 steps/s, ETA 22s", lines[1]), lines[1]
    assert lines[-1].startswith("prune[language=en]: 800/800 steps (100%), ")
    final = read_progress(tmp_path)
    assert final is not None and final.ok and final.done == 800 and final.total == 800 and final.seconds == pytest.approx(26, abs=0.1)
    assert final.stage == "prune" and 28 < final.rate < 33  # type: ignore[operator]


def test_recorder_logs_every_ten_seconds_without_a_total(tmp_path: Path) -> None:
    clock, lines = Clock(), []
    rec = ProgressRecorder(tmp_path / "progress.json", "job", "s", echo=lines.append, clock=clock)
    rec.start()
    for done in range(60):
        rec.update({"done": done, "total": None, "unit": "batch"})
        clock.now += 1.0
    rec.end(ok=False)
    assert lines[:2] == ["job: 0 batches", "job: 10 batches, 1.0 batches/s"]
    assert len(lines) == 7 and lines[-1].startswith("job: 59 batches")  # 0, 10, ..., 50, then the last one at the end


def test_job_line_reads_like_the_readme() -> None:
    assert job_line("prune[language=en]", 120, 800, "step", 3.2) == "prune[language=en]: 120/800 steps (15%), 3.2 steps/s, ETA 3m 32s"
    assert job_line("train", 3, 10, "step", 0.02) == "train: 3/10 steps (30%), 50.0 s/step, ETA 5m 50s"
    assert job_line("corpus", 5, 5, "batch", None) == "corpus: 5/5 batches (100%)"


# ------------------------------------------------------------------------- the study's ETA
def test_eta_from_history_runs_over_slots_and_along_dependency_chains() -> None:
    history = {"train": [100.0, 300.0, 200.0], "prune": [10.0, 30.0]}
    assert expected_seconds("train", history) == 200.0  # the median
    assert expected_seconds("train", history, elapsed=50.0) == 150.0
    assert expected_seconds("train", history, elapsed=500.0) is None  # ran longer than ever: nobody knows
    assert expected_seconds("train", history, elapsed=50.0, own_eta=12.0) == 12.0  # its own progress wins
    assert expected_seconds("eval", history) is None
    # four independent prune jobs on two slots: the work spread over the slots
    prunes = [Remaining(f"p{i}", (), expected_seconds("prune", history)) for i in range(4)]
    assert study_eta(prunes, slots=2).seconds == 40.0
    # train, then two prunes after it: the chain decides (200 + 20), not the work over 4 slots (60)
    chain = [Remaining("t", (), 200.0), Remaining("p1", ("t",), 20.0), Remaining("p2", ("t",), 20.0)]
    assert study_eta(chain, slots=4).seconds == 220.0
    assert study_eta(chain, slots=4).text() == "ETA ~3m 40s"


def test_eta_is_a_lower_bound_or_unknown_without_history() -> None:
    partly = study_eta([Remaining("t", (), 60.0), Remaining("e", ("t",), None)], slots=1)
    assert partly.seconds == 60.0 and partly.lower_bound and partly.text() == "ETA > 1m 00s"
    unknown = study_eta([Remaining("e", (), None)], slots=1)
    assert unknown.seconds is None and unknown.text() == "ETA unknown (no stage history yet)"
    assert study_eta([], slots=1).seconds == 0.0
    line = summary_line("demo", Counts(3, 2, 0, 5, 0, 10), 80.0, study_eta([Remaining("x", (), 250.0)], 1))
    assert line == "study demo: 3/10 done, 2 running, 0 failed, 5 queued; elapsed 1m 20s, ETA ~4m 10s"


def test_stage_history_reads_successful_attempts_of_every_submit(tmp_path: Path) -> None:
    jobs, clock = tmp_path / "jobs", Clock()
    for key, stage, seconds, ok in [("a", "train", 100, True), ("b", "train", 300, True), ("c", "train", 5, False), ("d", "prune", 7, True)]:
        rec = ProgressRecorder(jobs / key / "progress.json", key, stage, echo=lambda _: None, clock=clock)
        rec.start()
        clock.now += seconds
        rec.end(ok=ok)
    (jobs / "e").mkdir()  # a job that never ran
    (jobs / "f").mkdir()
    (jobs / "f" / "progress.json").write_text("{not json")
    assert stage_history(jobs) == {"train": [100.0, 300.0], "prune": [7.0]}


# ------------------------------------------------------------------------- the live view
def test_live_view_on_a_terminal_redraws_a_block_in_place(toy_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study, registry = load_study(toy_spec)
    plan = build_plan(study, registry)
    paths = StudyPaths(tmp_path / "root", study.name)
    monkeypatch.setenv("COLUMNS", "200")
    out, printed, clock = io.StringIO(), [], Clock()
    view = LiveView(paths, plan, 2, lambda line: out.write(line + "\n"), "tty", stream=out, clock=clock)
    keys = [j.key for j in plan.jobs]
    snap = Snapshot(Counts(1, 2, 0, 4, 0, 7), {keys[0]: 3.0, keys[1]: 5.0}, keys[3:])
    clock.now += 1.0
    view.tick(lambda: snap)
    first = out.getvalue()
    assert first.startswith("study toy: 1/7 done, 2 running, 0 failed, 4 queued; elapsed 1s, ETA unknown")
    assert "\n  emit[language=en]: running 3s\n" in first and "\x1b[" not in first
    view.tick(lambda: printed.append(1) or snap)  # type: ignore[func-returns-value]
    assert not printed  # at most one redraw a second
    view.say("[2/7] done    emit[language=de] (1.0s)")  # in the block's place ...
    assert out.getvalue()[len(first) :] == "\x1b[3F\x1b[J[2/7] done    emit[language=de] (1.0s)\n"
    clock.now += 0.3
    after = Snapshot(Counts(2, 1, 0, 4, 0, 7), {keys[0]: 3.3}, keys[3:])
    view.tick(lambda: after)  # ... and the block below it again, soon, with fresh counts
    assert out.getvalue().endswith("(1.0s)\nstudy toy: 2/7 done, 1 running, 0 failed, 4 queued; elapsed 1s, ETA unknown (no stage history yet)\n  emit[language=en]: running 3s\n")
    view.close()
    assert out.getvalue().endswith("\x1b[2F\x1b[J")


def test_interval_setting() -> None:
    assert interval_s({}) == 30.0 and interval_s({INTERVAL_ENV: "0.5"}) == 0.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(BadArgument, match=INTERVAL_ENV):
            interval_s({INTERVAL_ENV: bad})


# --------------------------------------------------------------------- through the real CLI
def test_running_job_shows_its_progress_in_its_file_status_and_submit(tmp_path: Path) -> None:
    hold, root = tmp_path / "hold", tmp_path / "root"
    hold.touch()
    spec = write_spec(tmp_path, f"{{steps: 6, sleep_s: 0.15, hold_at: 3, hold_while: {hold}}}")
    submit = cli("submit", str(spec), "--store", str(root), env={INTERVAL_ENV: "0.3"})
    try:
        # the progress file appears with done/total while the job runs (held at 3 of 6)
        wait_for(lambda: (root / "studies" / "prog" / "jobs").is_dir() and (p := read_progress(job_dir(root))) is not None and p.done == 3)
        progress = read_progress(job_dir(root))
        assert progress is not None and progress.total == 6 and progress.unit == "step" and progress.ok is None
        status = subprocess.run(
            [sys.executable, "-m", "orchestrator", "status", "prog", "--store", str(root)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        head, header, _, row = status.stdout.splitlines()[:4]
        assert re.match(r"study prog \(submitted .*\): 1 running; elapsed \d+s, ETA ~\d+s$", head), head
        assert header.split()[:3] == ["job", "state", "progress"]
        assert re.match(r"steps\s+running\s+3/6 steps \(50%\), ETA \d+s\s+local \d+", row), row
        as_json = subprocess.run(
            [sys.executable, "-m", "orchestrator", "status", "prog", "--store", str(root), "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        doc = json.loads(as_json.stdout)
        assert doc["jobs"][0]["progress"]["done"] == 3 and doc["jobs"][0]["progress"]["total"] == 6
        assert doc["progress"]["eta_s"] is not None and doc["progress"]["eta_lower_bound"] is False
        time.sleep(1.0)  # several periodic status lines while it is held
    finally:
        hold.unlink()
    out, _ = submit.communicate(timeout=120)
    assert submit.returncode == 0, out
    status_lines = [line for line in out.splitlines() if line.startswith("study prog: 0/1 done, 1 running")]
    assert len(status_lines) >= 2, out
    assert any("; running: steps: 3/6 steps (50%)" in line for line in status_lines), out
    assert "[1/1] done    steps" in out and "study prog: 0 cached, 1 succeeded" in out
    # the job log: one plain line per update, the last one 6/6, no carriage returns
    log = (job_dir(root) / "job.log").read_text()
    updates = [LINE.match(line) for line in log.splitlines() if LINE.match(line)]
    assert "\r" not in log and [m.group(1) for m in updates] == ["0", "1", "2", "3", "4", "5", "6"]
    final = read_progress(job_dir(root))
    assert final is not None and final.ok and final.done == 6 and final.seconds and final.seconds > 0.5
    assert list(stage_history(root / "studies" / "prog" / "jobs")) == ["steps"]  # the history of the next ETA


def test_quiet_submit_prints_no_progress(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "{steps: 4, sleep_s: 0.3}")
    proc = cli("-q", "submit", str(spec), "--store", str(tmp_path / "root"), env={INTERVAL_ENV: "0.2"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "study prog: 0 cached, 1 succeeded" in out  # the final summary, as it was
    assert "study prog: 0/1" not in out and "[1/1] done" not in out and "running 1 jobs" not in out, out


def test_submit_on_a_terminal_redraws_in_place(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "{steps: 8, sleep_s: 0.3}")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "submit", str(spec), "--store", str(tmp_path / "root")],
        cwd=ROOT, stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        if not select.select([leader], [], [], 0.5)[0]:
            continue
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side has closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode()
    assert "\x1b[J" in screen and "study prog: 0/1 done, 1 running" in screen
    assert re.search(r"  steps: \d/8 steps \(\d+%\)", screen), screen
    assert screen.rstrip().endswith("artifacts: python -m orchestrator artifacts prog --store " + str(tmp_path / "root"))


def test_only_rank_0_reports(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "{steps: 5, sleep_s: 0.15}", executor="executor:\n  resources:\n    steps: {processes: 2, cpus: 2}\n")
    study, registry = load_study(spec)
    plan = build_plan(study, registry)
    paths = StudyPaths(tmp_path / "root", study.name)
    report = LocalExecutor(paths, open_store(paths.root), max_parallel=1, echo=lambda _: None).submit(plan, spec)
    assert report.ok
    log = (job_dir(paths.root) / "job.log").read_text()
    assert "rank1" not in log and [LINE.match(x).group(1) for x in log.splitlines() if LINE.match(x)] == ["0", "1", "2", "3", "4", "5"]  # type: ignore[union-attr]
    progress = read_progress(job_dir(paths.root))
    assert progress is not None and progress.unit == "step" and progress.done == 5 and progress.ok
    assert json.loads((job_dir(paths.root) / "progress.json").read_text())["stage"] == "steps"
