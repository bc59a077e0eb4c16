"""What produced a result: every committed version records its job's parameters, stage version,
spec and code; every stage sees the provenance of everything upstream of it (``ctx.provenance``),
and ``artifacts --show`` prints one version's provenance and inputs.

The end-to-end tests submit the toy ``tokens``/``follow`` stages with real ``python -m
orchestrator`` processes; ``follow`` writes the ``ctx.provenance`` it was handed into its ``seen``
output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from test_lineage import SPEC, write_spec

from orchestrator.artifacts import ArtifactRef, LocalStore, Producer
from orchestrator.provenance import upstream
from orchestrator.runner import open_store


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def submitted(tmp_path: Path) -> tuple[Path, Path]:
    spec = write_spec(tmp_path, text=SPEC)
    root = tmp_path / "root"
    out = run_cli("submit", str(spec), "--store", str(root))
    assert out.returncode == 0, out.stdout + out.stderr
    return spec, root


def test_a_stage_sees_its_spec_code_job_and_every_upstream_version(tmp_path: Path) -> None:
    spec, root = submitted(tmp_path)
    store = open_store(root)
    seen = store.materialize(store.get("lin.follow.seen.language-de:latest").ref)
    prov = json.loads((seen / "provenance.json").read_text())["provenance"]
    assert prov["study"] == "lin" and prov["spec_path"] == str(spec.resolve())
    assert len(prov["spec_hash"]) == 64 and "numpy" in prov["code"]["packages"]
    assert prov["code"]["git_commit"]  # this checkout is a git repository
    assert prov["job"]["stage"] == "follow" and prov["job"]["params"]["sleep_s"] == 0.0
    refs = [e["ref"] for e in prov["upstream"]]
    assert refs == ["lin.tokens.a.language-de:v0"]  # the one input of follow-de, which has no inputs itself
    (tokens,) = prov["upstream"]
    assert tokens["stage"] == "tokens" and tokens["job_label"] == "tokens[language=de]"
    assert tokens["params"] == {"language": "de", "sleep_s": 0.0, "deterministic": False, "write_input": False, "late_write_s": 0.0, "progress": False}
    assert tokens["stage_version"] and tokens["seed"] is not None and tokens["spec_hash"] == prov["spec_hash"]


def test_upstream_lists_every_ancestor_once_producers_first_and_says_what_is_missing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")

    def version(name: str, inputs: tuple[ArtifactRef, ...], prov: dict[str, object]) -> ArtifactRef:
        folder = tmp_path / "src" / name
        folder.mkdir(parents=True)
        (folder / "x.txt").write_text(name)
        producer = Producer(job_key=f"k-{name}", study="s", stage=name, job_label=name, inputs=inputs, provenance=prov)
        return store.log(name, "t", folder, producer=producer).ref

    a = version("a", (), {})  # an old version: no params or stage version recorded
    b = version("b", (a,), {"params": {"p": 1}, "stage_version": "2"})
    c = version("c", (a, b, ArtifactRef("gone", 3)), {"params": {"q": 2}})
    d = version("d", (c, b), {})
    chain = upstream(store, [d, a])
    assert [e["ref"] for e in chain] == ["a:v0", "b:v0", "gone:v3", "c:v0", "d:v0"]
    by_ref = {e["ref"]: e for e in chain}
    assert by_ref["a:v0"]["params"] is None and by_ref["a:v0"]["stage_version"] is None
    assert by_ref["b:v0"]["params"] == {"p": 1} and by_ref["b:v0"]["inputs"] == ["a:v0"]
    assert by_ref["gone:v3"] == {"ref": "gone:v3", "missing": True, "inputs": []}


def test_artifacts_show_prints_one_versions_provenance_and_inputs(tmp_path: Path) -> None:
    _, root = submitted(tmp_path)
    out = run_cli("artifacts", "lin", "--store", str(root), "--show", "lin.follow.a.language-en")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in (
        "lin.follow.a.language-en:v0",
        "follow[language=en]",  # the producing job
        "sleep_s",  # its parameters
        "git commit",
        "numpy",
        "lin.tokens.a.language-en:v0",  # its input
    ):
        assert expected in text, f"{expected!r} not in\n{text}"
    missing = run_cli("artifacts", "lin", "--store", str(root), "--show", "lin.nothing:v4")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "lin.nothing" in missing.stderr
