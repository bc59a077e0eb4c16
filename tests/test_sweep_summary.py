"""The sweep summary stage on hand-made sweep outputs (two thresholds x two languages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stagekit import FakeContext, make_input, run_stage

from stages.sweep_summary import SWEEP_SUMMARY, mean_pair_similarity, own_relative


def artifact(root: Path, name: str, files: dict[str, object]) -> Path:
    path = root / name
    path.mkdir(parents=True)
    for fname, doc in files.items():
        (path / fname).write_text(json.dumps(doc))
    return path


def sweep_inputs(tmp_path: Path) -> dict[str, object]:
    masks, cross, stats, sims = [], [], [], []
    for t, kept in ((1.1, {"en": 10, "de": 8}), (1.3, {"en": 6, "de": 5})):
        for lang, heads in kept.items():
            path = artifact(
                tmp_path, f"mask-{t}-{lang}", {"mask.json": {"language": lang, "heads_kept": heads, "total_heads": 12}}
            )
            masks.append(make_input(path, "head-mask", point={"language": lang, "threshold": t}))
        ce = {"rows": ["en", "de", "full"], "cols": ["en", "de"], "perplexity": [[12, 30], [40, 22], [10, 20]]}
        cross.append(make_input(artifact(tmp_path, f"ce-{t}", {"cross_eval.json": ce}), "metrics", point={"threshold": t}))
        stats.append(
            make_input(
                artifact(tmp_path, f"ms-{t}", {"mask_stats.json": {"jaccard_mean": 0.5 if t == 1.1 else 0.25}}),
                "metrics",
                point={"threshold": t},
            )
        )
        # biased CKA of unrelated representations is far from 0: the summary averages the debiased one
        sim = {"pairwise": {"subnetwork": {"cka_debiased": {"en-de": [0.2, 0.4, None]}, "cka": {"en-de": [0.7, 0.8, None]}}}}
        sims.append(make_input(artifact(tmp_path, f"sim-{t}", {"similarity.json": sim}), "metrics", point={"threshold": t}))
    return {"masks": masks, "cross_eval": cross, "mask_stats": stats, "similarity": sims}


def test_summary_table_and_figures(tmp_path: Path) -> None:
    ctx = FakeContext(tmp_path / "run")
    meta = run_stage(SWEEP_SUMMARY, {}, ctx, sweep_inputs(tmp_path / "in"))
    out = tmp_path / "run" / "outputs" / "figures"
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["threshold"], r["language"], r["heads_kept"]) for r in rows] == [
        (1.1, "de", 8),
        (1.1, "en", 10),
        (1.3, "de", 5),
        (1.3, "en", 6),
    ]
    de = rows[0]
    assert de["own_relative_perplexity"] == pytest.approx(22 / 20)
    assert de["mean_jaccard"] == 0.5 and de["mean_cka"] == pytest.approx(0.3)
    assert rows[1]["mean_cka"] is None  # the reference against itself
    assert meta == {
        "figures": {
            "axis": "threshold",
            "points": [1.1, 1.3],
            "rows": 4,
            "figures": ["heads_kept", "own_relative_perplexity", "mean_jaccard", "mean_cka"],
        }
    }
    for key in meta["figures"]["figures"]:
        assert (out / f"sweep_{key}.png").read_bytes()[:4] == b"\x89PNG" and (out / f"sweep_{key}.pdf").exists()
    assert (out / "summary.csv").read_text().splitlines()[0] == (
        "threshold,language,heads_kept,total_heads,own_relative_perplexity,mean_jaccard,mean_cka"
    )


def test_missing_axis_is_a_clear_error(tmp_path: Path) -> None:
    path = artifact(tmp_path, "m", {"mask.json": {"language": "en", "heads_kept": 3}})
    with pytest.raises(ValueError, match="has no sweep axis 'threshold'"):
        run_stage(
            SWEEP_SUMMARY, {}, FakeContext(tmp_path / "run"), {"masks": [make_input(path, "head-mask", point={"language": "en"})]}
        )


def test_pure_helpers() -> None:
    doc = {"rows": ["en", "full"], "cols": ["en"], "perplexity": [[15.0], [10.0]]}
    assert own_relative(doc, "en") == 1.5 and own_relative(doc, "de") is None and own_relative(None, "en") is None
    sim = {"pairwise": {"subnetwork": {"cka": {"de-en": [0.5, 1.0]}}}}
    assert mean_pair_similarity(sim, "en", "de", "cka") == 0.75
