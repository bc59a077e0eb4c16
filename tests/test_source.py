"""Raw spec documents: lines of every field, extends, overrides, ${...} references."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TOY_SPEC

from orchestrator.errors import SpecError
from orchestrator.overrides import apply_overrides
from orchestrator.source import deep_merge, load_source
from orchestrator.spec import load_study


def test_lines_point_at_keys_and_items(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("a:\n  b: 1\n  c:\n    - x\n    - y\n")
    src = load_source(path)
    assert src.where(("a", "b")) == f"{path}:2"
    assert src.where(("a", "c", 1)) == f"{path}:5"
    assert src.where(("a", "c", 1, "deeper")) == f"{path}:5"  # nearest known prefix
    assert src.where(("zzz",)) == str(path)


def test_extends_merges_mappings_and_keeps_each_fields_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(TOY_SPEC)
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: toy2\nstages:\n  emit:\n    params:\n      value: x\n")
    src = load_source(child)
    assert src.data["name"] == "toy2" and src.data["languages"] == ["en", "de", "fr"]
    assert src.data["stages"]["emit"]["matrix"] == {"language": "${languages}"}  # merged, not replaced
    assert src.where(("languages",)) == f"{tmp_path / 'base.yaml'}:2"
    with pytest.raises(SpecError) as e:
        load_study(child)
    assert f"{child}:6: stages.emit.params.value: Input should be a valid number" in str(e.value)


def test_extends_cycle_and_missing_base(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(SpecError, match="a cycle"):
        load_source(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nope.yaml\n")
    with pytest.raises(SpecError, match="nope.yaml: file not found"):
        load_source(tmp_path / "c.yaml")


def test_deep_merge() -> None:
    assert deep_merge({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"c": [2]}, "e": 2}) == {"a": {"b": 1, "c": [2]}, "d": 1, "e": 2}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": None}, "x": None}) == {"a": {"c": 2}}  # null deletes


def test_overrides_record_their_origin(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("a:\n  b: 1\n")
    src = apply_overrides(load_source(path), ["a.b=[1, 2]", "x.y.z=true"])
    assert src.data == {"a": {"b": [1, 2]}, "x": {"y": {"z": True}}}
    assert src.where(("a", "b")) == "--set a.b=[1, 2]"
    assert src.where(("a",)) == f"{path}:1"
