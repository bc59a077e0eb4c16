"""Machine-readable CLI output and -q/-v, as a user types them: `status --json`, `artifacts
--json` (also with --lineage/--show), `artifacts get REF --out DIR`, and -q/-v before or after
the command, on a store the toy study was run into through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TESTS, TOY_SPEC

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
TOTAL = "toy.total.total"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=120
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with toy.yaml, run into its default store (.orchestrator)."""
    work = tmp_path_factory.mktemp("json")
    (work / "toy.yaml").write_text(TOY_SPEC)
    out = cli("submit", "toy.yaml", cwd=work)
    assert out.returncode == 0, out.stdout + out.stderr
    return work


def as_json(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_status_json_has_what_the_table_shows_and_each_jobs_outputs(work: Path) -> None:
    doc = as_json(cli("status", "toy", "--json", cwd=work))
    assert doc["study"] == "toy" and doc["counts"] == {"succeeded": 7} and doc["submitted_at"] and doc["warning"] is None
    labels = [job["label"] for job in doc["jobs"]]
    assert labels[0] == "emit[language=en]" and labels[-1] == "total" and len(labels) == 7
    total = doc["jobs"][-1]
    assert {"key", "label", "stage", "point", "state", "attempt", "updated_at", "exit_code", "executor", "external_id", "where",
            "log", "last_error", "outputs"} <= set(total)  # fmt: skip
    assert total["state"] == total["recorded_state"] == "succeeded" and total["exit_code"] == 0 and total["stage"] == "total"
    assert Path(total["log"]).exists() and total["log"] in cli("status", "toy", cwd=work).stdout
    shown = as_json(cli("artifacts", "toy", "--show", TOTAL, "--json", cwd=work))
    assert total["outputs"] == {
        "total": {"ref": f"{TOTAL}:v0", "type": "number", "digest": shown["digest"], "size": shown["size"]}
    }
    assert doc["jobs"][0]["point"] == {"language": "en"}


def test_status_json_of_failed_jobs_names_the_error(toy_spec: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    assert cli("submit", str(toy_spec), "--store", store, "--set", "stages.scale.params.fail=true", cwd=tmp_path).returncode == 1
    doc = as_json(cli("status", "toy", "--store", store, "--json", cwd=tmp_path))
    assert doc["counts"] == {"failed": 3, "skipped": 1, "succeeded": 3}
    scale = next(job for job in doc["jobs"] if job["label"] == "scale[language=en]")
    assert scale["state"] == "failed" and scale["outputs"] is None and scale["exit_code"] == 1
    assert scale["last_error"] == "RuntimeError: scale failed on purpose for en"


def test_artifacts_json_lineage_and_show(work: Path) -> None:
    doc = as_json(cli("artifacts", "toy", "--json", cwd=work))
    refs = [a["ref"] for a in doc["artifacts"]]
    assert len(refs) == 7 and refs[-1] == f"{TOTAL}:v0" and doc["jobs_without_outputs"] == [] and doc["problems"] == {}
    last = doc["artifacts"][-1]
    assert (last["output"], last["job_label"], last["type"], last["file_count"]) == ("total", "total", "number", 1)
    assert len(last["digest"]) == 64 and last["producer"]["stage"] == "total" and "latest" in last["aliases"]
    tree = as_json(cli("artifacts", "toy", "--lineage", TOTAL, "--json", cwd=work))
    assert tree["ref"] == f"{TOTAL}:v0" and [len(i["inputs"]) for i in tree["inputs"]] == [1, 1, 1]
    assert tree["inputs"][0]["inputs"][0]["ref"] == "toy.emit.number.language-en:v0"
    shown = as_json(cli("artifacts", "toy", "--show", f"{TOTAL}:study-toy", "--json", cwd=work))
    assert shown["ref"] == f"{TOTAL}:v0" and shown["files"][0]["path"] == "value.json"
    assert shown["producer"]["provenance"]["params"] == {"label": "sum"} and shown["metadata"]["value"] == 18.0


def test_artifacts_get_copies_a_version_out(work: Path, tmp_path: Path) -> None:
    got = cli("artifacts", "get", f"{TOTAL}:latest", "--out", str(tmp_path / "total"), cwd=work)
    assert got.returncode == 0 and "verified, copied to" in got.stdout, got.stderr
    assert json.loads((tmp_path / "total" / "value.json").read_text())["value"] == 18.0
    again = cli("artifacts", "get", TOTAL, "--out", str(tmp_path / "total"), "--json", "--store", ".orchestrator", cwd=work)
    assert as_json(again)["path"] == str(tmp_path / "total")  # same files there: verified, kept
    other = cli("artifacts", "get", "toy.emit.number.language-de:v0", "--out", str(tmp_path / "total"), cwd=work)
    assert other.returncode == 2 and "holds other files" in other.stderr
    forced = cli(
        "artifacts", "get", "toy.emit.number.language-de:v0", "--out", str(tmp_path / "total"), "--force", "-q", cwd=work
    )
    assert forced.returncode == 0 and forced.stdout.strip() == str(tmp_path / "total")
    bad = cli("artifacts", "get", f"{TOTAL}:v3", "--out", str(tmp_path / "x"), cwd=work)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert "has no version or alias 'v3'; versions: v0; aliases: latest" in bad.stderr and not (tmp_path / "x").exists()
    lacking = cli("artifacts", "get", "--out", str(tmp_path / "x"), cwd=work)
    assert lacking.returncode == 2 and "artifacts get needs a reference" in lacking.stderr
    stray = cli("artifacts", "toy", "extra", cwd=work)
    assert stray.returncode == 2 and "artifacts takes a study" in stray.stderr
    nowhere = cli("artifacts", "get", TOTAL, "--out", str(tmp_path / "x"), "--store", str(tmp_path / "none"), cwd=work)
    assert nowhere.returncode == 2 and "no artifact store under" in nowhere.stderr


def test_quiet_and_verbose_before_or_after_the_command(work: Path) -> None:
    table = cli("status", "toy", cwd=work).stdout
    assert table.startswith("study toy (submitted ")
    for args in (("-q", "status", "toy"), ("status", "toy", "-q"), ("status", "toy", "--quiet")):
        quiet = cli(*args, cwd=work)
        assert quiet.returncode == 0 and quiet.stdout.startswith("job ") and "submitted" not in quiet.stdout, args
    verbose = cli("status", "toy", "-v", cwd=work).stdout.splitlines()
    assert {"key", "updated"} <= set(verbose[1].split()) - set(table.splitlines()[1].split())  # -v: full keys, times
    key = as_json(cli("status", "toy", "--json", cwd=work))["jobs"][0]["key"]
    assert f"emit[language=en]   {key}" in verbose[3]
    refs = cli("artifacts", "toy", "-q", cwd=work).stdout.splitlines()
    assert len(refs) == 7 and all(":v" in r and " " not in r for r in refs)  # one reference per line, for scripts
    assert "digest" in cli("-v", "artifacts", "toy", cwd=work).stdout.splitlines()[0]
    job_key = as_json(cli("artifacts", "toy", "--show", TOTAL, "--json", cwd=work))["producer"]["job_key"]
    assert job_key in cli("artifacts", "toy", "--lineage", TOTAL, "-v", cwd=work).stdout
    assert "file      value.json" in cli("artifacts", "toy", "--show", TOTAL, "-v", cwd=work).stdout
    fsck = cli("fsck", "-q", cwd=work)
    assert fsck.returncode == 0 and fsck.stdout == ""  # healthy: nothing to say
    assert "store ok" in cli("fsck", cwd=work).stdout


def test_plan_verbose_still_shows_the_parameters(work: Path) -> None:
    for args in (("plan", "toy.yaml", "-v"), ("plan", "toy.yaml", "--verbose"), ("-v", "plan", "toy.yaml")):
        out = cli(*args, cwd=work)
        assert out.returncode == 0 and "params" in out.stdout and "'value': 3" in out.stdout, args
    assert "params" not in cli("plan", "toy.yaml", cwd=work).stdout
    both = cli("status", "toy", "-q", "-v", cwd=work)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
