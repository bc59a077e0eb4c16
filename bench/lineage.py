"""Lineage trials: how often concurrent submits tear a version or run a job twice, and how often a
consumer reads bytes other than its lineage names. Every count must be 0.

1. Race trials: ``--rounds`` rounds, each on a fresh store, of ``--submits`` concurrent
   ``python -m orchestrator submit`` processes of one study (3 nondeterministic ``tokens`` jobs,
   3 ``follow`` jobs reading them; every file carries its run's token). Counted: versions whose
   files come from more than one run (torn), stage runs beyond one per job (duplicates), submits
   that did not exit 0.
2. Corruption trials: ``--rounds`` times, on a finished study (whose producer writes the same
   bytes every run), damage one input blob of a ``follow`` job (flip a byte, truncate, or delete
   it: in turn), rerun that job with ``--force`` and see what it read (the ``follow`` stage notes
   the sha256 of the bytes it read). Counted:
   consumers that read bytes other than the manifest's; then ``submit --force`` must repair the
   blob (fsck clean again) and the consumer, run again, read the right bytes.

The toy stages live in tests/lineagestages (tests/ is put on PYTHONPATH here). ``--quick``: 2 rounds each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from common import PYTHON, ROOT, env

TESTS = ROOT / "tests"
SPEC = """\
name: lin
languages: [en, de, fr]
stage_package: lineagestages
stages:
  tokens:
    matrix: {language: "${languages}"}
    params: {sleep_s: 0.3}
  follow:
    matrix: {language: "${languages}"}
    inputs: {src: {stage: tokens, output: a}}
"""
DAMAGE = ("flip", "truncate", "delete")
# the producer writes the same bytes every run, so that its rerun can repair a damaged blob
DETERMINISTIC = SPEC.replace("params: {sleep_s: 0.3}", "params: {sleep_s: 0, deterministic: true}")


def _env(runlog: Path) -> dict[str, str]:
    base = env(TOYSTAGES_RUNLOG=str(runlog))
    base["PYTHONPATH"] = os.pathsep.join([str(TESTS), base["PYTHONPATH"]])
    return base


def _cli(args: list[str], runlog: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "orchestrator", *args], env=_env(runlog), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _store(root: Path):  # type: ignore[no-untyped-def]
    from orchestrator.runner import open_store

    return open_store(root)


def race_round(work: Path, submits: int) -> tuple[int, int, int]:
    """(torn versions, duplicate runs, failed submits) of one round."""
    root, runlog, spec = work / "root", work / "runs.log", work / "lin.yaml"
    spec.write_text(SPEC)
    procs = [_cli(["submit", str(spec), "--store", str(root)], runlog) for _ in range(submits)]
    failed = sum(p.wait(timeout=300) != 0 for p in procs)
    runs = Counter(line.split()[0] for line in runlog.read_text().splitlines())
    duplicates = sum(n - 1 for n in runs.values())
    store, torn = _store(root), 0
    for name in store.names():
        for version in store.versions(name):
            folder = store.materialize(version.ref)
            torn += len({json.loads((folder / f.path).read_text())["token"] for f in version.files}) > 1
    return torn, duplicates, failed


def _follow_record(root: Path) -> tuple[Path, str, str]:
    """(job.json of follow[language=en], the blob of its input's part0.json, that file's sha256)."""
    study = root / "studies" / "lin"
    plan = json.loads((study / "plan.json").read_text())
    job = next(j for j in plan["jobs"] if j["label"] == "follow[language=en]")
    upstream = job["deps"][0]
    store = _store(root)
    version = store.get(store.job_outputs(upstream)["a"])
    entry = next(f for f in version.files if f.path == "part0.json")
    blob = store.root / "objects" / entry.sha256[:2] / entry.sha256[2:]
    return study / "jobs" / job["key"] / "job.json", str(blob), entry.sha256


def _damage(blob: str, how: str) -> None:
    if how == "delete":
        os.unlink(blob)
        return
    os.chmod(blob, 0o644)
    data = Path(blob).read_bytes()
    Path(blob).write_bytes(data[: len(data) // 2] if how == "truncate" else bytes([data[0] ^ 1]) + data[1:])


def _read_sha(root: Path, record: Path) -> str | None:
    """The sha256 of the input bytes the last run of the follow job saw (None: it did not commit)."""
    key = record.parent.name
    outputs = _store(root).job_outputs(key)
    if outputs is None:
        return None
    return json.loads((_store(root).materialize(outputs["seen"]) / "src.json").read_text())["sha256"]


def corruption_round(work: Path, how: str) -> tuple[int, bool]:
    """(consumers that read bytes other than the manifest's: 0 or 1, whether repair worked)."""
    root, runlog, spec = work / "root", work / "runs.log", work / "lin.yaml"
    spec.write_text(DETERMINISTIC)
    subprocess.run([PYTHON, "-m", "orchestrator", "submit", str(spec), "--store", str(root)], env=_env(runlog), check=True,
                   capture_output=True)  # fmt: skip
    record, blob, sha = _follow_record(root)
    shutil.rmtree(root / "artifacts" / "materialized", ignore_errors=True)  # a consumer on another node: no view yet
    _damage(blob, how)
    _cli(["run-job", str(record), "--force"], runlog).wait(timeout=120)
    seen = _read_sha(root, record)
    bad_reads = int(seen is not None and seen != sha)
    producer = _cli(["submit", str(spec), "--store", str(root), "--force"], runlog)
    fsck = _cli(["fsck", "--store", str(root)], runlog) if producer.wait(timeout=300) == 0 else None
    repaired = fsck is not None and fsck.wait(timeout=120) == 0 and _read_sha(root, record) == sha
    return bad_reads, repaired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--submits", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    totals = Counter[str]()
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="lineage-race-") as tmp:
            torn, dup, failed = race_round(Path(tmp), args.submits)
        totals.update(race_rounds=1, submits=args.submits, torn=torn, duplicates=dup, failed_submits=failed)
        print(f"race round {r + 1}: torn {torn}, duplicate runs {dup}, failed submits {failed}", flush=True)
    for r in range(rounds):
        how = DAMAGE[r % len(DAMAGE)]
        with tempfile.TemporaryDirectory(prefix="lineage-corrupt-") as tmp:
            bad, repaired = corruption_round(Path(tmp), how)
        totals.update(corruption_trials=1, corrupt_reads=bad, not_repaired=int(not repaired))
        print(f"corruption trial {r + 1} ({how}): consumers that read corrupt bytes {bad}, repaired {repaired}", flush=True)
    columns = ["race rounds", "submits", "torn versions", "duplicate stage runs", "failed submits"]
    columns += ["corruption trials", "corrupt reads", "not repaired"]
    print("\n| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    t = totals
    print(f"| {t['race_rounds']} | {t['submits']} | {t['torn']} | {t['duplicates']} | {t['failed_submits']} "
          f"| {t['corruption_trials']} | {t['corrupt_reads']} | {t['not_repaired']} |")  # fmt: skip


if __name__ == "__main__":
    main()
