"""The command line as a user types it: python -m orchestrator ..."""

from __future__ import annotations

from pathlib import Path

from conftest import cli


def test_validate_plan_submit_status_artifacts(toy_spec: Path, tmp_path: Path) -> None:
    work = tmp_path
    ok = cli("validate", str(toy_spec), cwd=work)
    assert ok.returncode == 0 and "ok - study 'toy', 3 stages, 7 jobs" in ok.stdout

    plan = cli("plan", str(toy_spec), cwd=work)
    assert plan.returncode == 0 and "7 jobs, 0 cached, 7 to run" in plan.stdout
    assert "total" in plan.stdout and "scale[language=en], scale[language=de], scale[language=fr]" in plan.stdout

    sub = cli("submit", str(toy_spec), cwd=work)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    assert "study toy: 0 cached, 7 succeeded" in sub.stdout
    assert (work / ".orchestrator" / "artifacts").is_dir()  # default storage root, relative to cwd

    again = cli("submit", str(toy_spec), cwd=work)
    assert "7 of 7 jobs cached" in again.stdout and "nothing to run" in again.stdout
    assert "7 cached, 0 to run" in cli("plan", str(toy_spec), cwd=work).stdout

    status = cli("status", "toy", cwd=work)
    assert status.returncode == 0 and "7 cached" in status.stdout and "emit[language=de]" in status.stdout

    arts = cli("artifacts", "toy", cwd=work)
    assert "toy.total.total:v0" in arts.stdout and "number" in arts.stdout

    lineage = cli("artifacts", "toy", "--lineage", "toy.total.total", cwd=work)
    lines = lineage.stdout.splitlines()
    assert lines[0].startswith("toy.total.total:v0 [number] <- total")
    assert "  toy.scale.number.language-en:v0 [number] <- scale[language=en]" in lines[1]
    assert "    toy.emit.number.language-en:v0 [number] <- emit[language=en]" in lines[2]


def test_failed_submit_exits_1_and_prints_the_log(toy_spec: Path, tmp_path: Path) -> None:
    store = tmp_path / "my store"
    sub = cli("submit", str(toy_spec), "--store", str(store), "--set", "stages.scale.params.fail=true", cwd=tmp_path)
    assert sub.returncode == 1
    assert "3 failed, 1 skipped" in sub.stdout
    assert f"FAILED scale[language=en]: log {store}/studies/toy/jobs/" in sub.stdout
    assert "RuntimeError: scale failed on purpose for en" in sub.stdout  # the log's tail
    status = cli("status", "toy", "--store", str(store), cwd=tmp_path)
    assert "3 failed" in status.stdout and "1 skipped" in status.stdout


def test_unknown_study_and_artifact_are_clear_errors(tmp_path: Path) -> None:
    status = cli("status", "nope", cwd=tmp_path)
    assert status.returncode == 2 and "no study 'nope'" in status.stderr and "Traceback" not in status.stderr
    arts = cli("artifacts", "nope", "--lineage", "x.y", cwd=tmp_path)
    assert arts.returncode == 2 and "Traceback" not in arts.stderr


def test_slurm_without_slurm_fails_clearly_and_submits_nothing(toy_spec: Path, tmp_path: Path) -> None:
    no_slurm = {"PATH": str(tmp_path)}  # a machine without sbatch/squeue/scancel
    sub = cli("submit", str(toy_spec), "--executor", "slurm", cwd=tmp_path, env=no_slurm)
    assert sub.returncode == 1 and "executor 'slurm' needs SLURM's commands" in sub.stderr
    assert "--dry-run" in sub.stderr and "Traceback" not in sub.stderr
    assert not (tmp_path / ".orchestrator" / "studies").exists()
    dry = cli("submit", str(toy_spec), "--executor", "slurm", "--dry-run", cwd=tmp_path, env=no_slurm)
    assert dry.returncode == 0, dry.stderr
    assert (
        "nothing submitted" in dry.stdout and "00-emit.sbatch" in dry.stdout and "#SBATCH --array               0-2" in dry.stdout
    )
    assert "--dependency=aftercorr:<emit>" in dry.stdout and "--dependency=afterok:<scale>" in dry.stdout


def test_no_command_prints_help(tmp_path: Path) -> None:
    out = cli(cwd=tmp_path)
    assert out.returncode == 2 and "validate" in out.stdout and "submit" in out.stdout


def test_plots_exports_figures_and_fsck_checks_the_store(toy_spec: Path, tmp_path: Path) -> None:
    assert cli("submit", str(toy_spec), cwd=tmp_path).returncode == 0
    missing = cli("plots", "toy", cwd=tmp_path)
    assert missing.returncode == 1 and "has no committed 'figures' artifact yet" in missing.stderr
    spec = tmp_path / "charted.yaml"
    spec.write_text(toy_spec.read_text().replace("stage_package:", "  chart:\n    inputs: {total: total}\nstage_package:"))
    assert cli("submit", str(spec), cwd=tmp_path).returncode == 0
    out = cli("plots", "toy", "--out", str(tmp_path / "figs"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "figs" / "toy.chart.figures"
    assert "1 figures" in out.stdout and f"report: {folder / 'report.html'}" in out.stdout
    assert (folder / "total.png").read_bytes().endswith(b"18.0")
    (folder / "total.png").write_bytes(b"edited")  # a copy: editing it leaves the store intact
    # copied out of the blobs, verified, without writing a view into the store (it may be read-only)
    assert not (tmp_path / ".orchestrator" / "artifacts" / "materialized" / "toy.chart.figures").exists()
    again = cli("plots", "toy", "--out", str(tmp_path / "figs"), cwd=tmp_path)  # the edited copy is replaced
    assert again.returncode == 0 and (folder / "total.png").read_bytes().endswith(b"18.0")
    fsck = cli("fsck", cwd=tmp_path)
    assert fsck.returncode == 0 and "store ok" in fsck.stdout


def test_local_dry_run_shows_what_would_run(toy_spec: Path, tmp_path: Path) -> None:
    assert cli("submit", str(toy_spec), cwd=tmp_path).returncode == 0
    dry = cli("submit", str(toy_spec), "--dry-run", "--set", "stages.total.params.label=x", cwd=tmp_path)
    assert dry.returncode == 0 and "7 jobs, 6 cached, 1 to run" in dry.stdout
    assert "study toy:" in dry.stdout and "succeeded" not in dry.stdout


def test_orchestrator_store_names_the_default_storage_root_everywhere(toy_spec: Path, tmp_path: Path) -> None:
    """``$ORCHESTRATOR_STORE`` is the storage root of every command (as of ``orchestrator.api``)
    where neither ``--store`` nor the spec's ``storage.root`` names one."""
    work, shared = tmp_path / "work", tmp_path / "shared"
    work.mkdir()
    env = {"ORCHESTRATOR_STORE": str(shared)}
    sub = cli("submit", str(toy_spec), cwd=work, env=env)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    assert (shared / "artifacts").is_dir() and not (work / ".orchestrator").exists()
    for args in (["status", "toy"], ["artifacts", "toy"], ["fsck"], ["plan", str(toy_spec)]):
        out = cli(*args, cwd=work, env=env)
        assert out.returncode == 0 and "error" not in out.stderr, (args, out.stdout + out.stderr)
    assert "7 cached" in cli("plan", str(toy_spec), cwd=work, env=env).stdout
    got = cli("artifacts", "get", "toy.total.total", "--out", str(tmp_path / "got"), cwd=work, env=env)
    assert got.returncode == 0 and (tmp_path / "got").is_dir(), got.stderr

    own = tmp_path / "own.yaml"  # a spec that names its storage root keeps it; --store beats both
    own.write_text(toy_spec.read_text() + f"storage: {{root: {tmp_path / 'own'}}}\n")
    assert cli("submit", str(own), "-q", cwd=work, env=env).returncode == 0 and (tmp_path / "own" / "artifacts").is_dir()
    assert cli("status", "toy", "--store", str(tmp_path / "own"), cwd=work, env=env).returncode == 0
    assert cli("status", "toy", "--store", str(tmp_path / "none"), cwd=work, env=env).returncode != 0
