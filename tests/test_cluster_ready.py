"""Cluster readiness: `prefetch`, partition/account warnings, full_study.yaml, GPU fail-fast and device naming."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("SBATCH_PARTITION", "SBATCH_ACCOUNT")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=300,
    )


# ---------------------------------------------------------------------------------------------
# prefetch (toy stages: emit has a hook, scale and total have none)

TWICE = """\
  emit_again:
    stage: emit
    params: {value: 3, language: en}
"""


def test_prefetch_calls_each_hook_once_per_distinct_params(toy_spec: Path, tmp_path: Path) -> None:
    spec = tmp_path / "twice.yaml"
    spec.write_text(toy_spec.read_text().replace("stage_package: toystages\n", "") + TWICE + "stage_package: toystages\n")
    log = tmp_path / "calls.txt"
    run = cli("prefetch", str(spec), cwd=tmp_path, env={"TOYSTAGES_PREFETCH_LOG": str(log)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(log.read_text().splitlines()) == ["de 3.0", "en 3.0", "fr 3.0"]  # emit_again = emit[language=en]
    out = run.stdout
    assert "[1/3] emit[language=en] (+1 jobs with the same parameters)" in out
    assert "  fetched toy data de" in out and "  fetched toy value 3.0" in out
    assert "prefetched 6 items for 3 distinct stage parameter sets" in out
    assert "nothing to fetch for: scale, total" in out
    assert not (tmp_path / ".orchestrator").exists()  # nothing ran, nothing was written


def test_prefetch_reports_a_failing_hook_and_goes_on(toy_spec: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.txt"
    run = cli("prefetch", str(toy_spec), cwd=tmp_path, env={"TOYSTAGES_PREFETCH_LOG": str(log), "TOYSTAGES_PREFETCH_FAIL": "de"})
    assert run.returncode == 1 and "Traceback" not in run.stdout + run.stderr
    assert sorted(log.read_text().splitlines()) == ["en 3.0", "fr 3.0"]
    assert "FAILED emit[language=de]: OSError: cannot reach the toy hub for de\n" in run.stdout
    assert "1 failed: fix the above" in run.stdout and "second line" not in run.stdout


def test_prefetch_of_an_invalid_spec_exits_2(toy_spec: Path, tmp_path: Path) -> None:
    run = cli("prefetch", str(toy_spec), "--set", "stages.emit.params.nope=1", cwd=tmp_path)
    assert run.returncode == 2 and "nope" in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------------------------------------
# partition/account warnings


def warnings(run: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("warning:")]


def test_validate_warns_about_partition_and_account_on_slurm_only(toy_spec: Path, tmp_path: Path) -> None:
    local = cli("validate", str(toy_spec), cwd=tmp_path)
    assert local.returncode == 0 and warnings(local) == []
    slurm = cli("validate", str(toy_spec), "--executor", "slurm", cwd=tmp_path)
    assert slurm.returncode == 0 and "ok - study 'toy'" in slurm.stdout
    assert warnings(slurm) == [
        "warning: no SLURM partition set for any stage: sbatch uses the cluster's default, which many clusters "
        "refuse; set executor.resources.default.partition (or per stage), or export SBATCH_PARTITION",
        "warning: no SLURM account set for any stage: sbatch uses the cluster's default, which many clusters "
        "refuse; set executor.resources.default.account (or per stage), or export SBATCH_ACCOUNT",
    ]
    part = cli("validate", str(toy_spec), "--executor", "slurm", "--set", "executor.resources.default.partition=gpu", cwd=tmp_path)
    assert [w.split(":")[1] for w in warnings(part)] == [" no SLURM account set for any stage"]
    both = cli(
        "validate", str(toy_spec), "--executor", "slurm", "--set", "executor.resources.default.partition=gpu",
        cwd=tmp_path, env={"SBATCH_ACCOUNT": "proj"},
    )
    assert both.returncode == 0 and warnings(both) == []


def test_warnings_follow_stage_and_point_resources(toy_spec: Path, tmp_path: Path) -> None:
    spec = tmp_path / "points.yaml"
    spec.write_text(toy_spec.read_text() + (
        "executor:\n"
        "  backend: slurm\n"
        "  resources:\n"
        "    default: {account: proj}\n"
        "    emit: {partition: cpu}\n"
        "    scale[language=en]: {partition: gpu}\n"
        "    total: {extra: {partition: big}}\n"
    ))
    run = cli("validate", str(spec), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(warnings(run)) == 1
    assert warnings(run)[0].startswith("warning: no SLURM partition set for scale[language=de], scale[language=fr]: ")
    dry = cli("submit", str(spec), "--dry-run", cwd=tmp_path)  # submit warns too (a dry run needs no SLURM)
    assert dry.returncode == 0, dry.stderr
    assert warnings(dry) == warnings(run)


def test_full_study_validates_and_warns_about_its_placeholders(tmp_path: Path) -> None:
    run = cli("validate", str(ROOT / "specs" / "full_study.yaml"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert [w.split(":")[1] for w in warnings(run)] == [" no SLURM partition set for any stage", " no SLURM account set for any stage"]
    filled = cli(
        "validate", str(ROOT / "specs" / "full_study.yaml"), "--set", "executor.resources.default.partition=gpu",
        "--set", "executor.resources.default.account=proj", cwd=tmp_path,
    )
    assert filled.returncode == 0 and warnings(filled) == []


def test_full_study_time_limits_fit_a_day_and_train_checkpoints() -> None:
    from orchestrator.spec import load_study

    study, registry = load_study(ROOT / "specs" / "full_study.yaml")
    for sid in study.stages:
        res = study.executor.resources_for(sid)
        assert res.time_min is not None and res.time_min <= 24 * 60, sid
        checkpoints = registry.get(study.stage_name(sid)).checkpoints  # type: ignore[union-attr]
        assert checkpoints or res.time_min * 60 > res.signal_lead_s
    train = study.executor.resources_for("train")
    assert registry.get("train").checkpoints and train.max_requeues >= 1 and train.gpus == 1  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# the real stages' prefetch hooks, offline, against a hand-made Hugging Face cache

HUB_NAME = "tiny-org/tiny-xlmr"


def make_tiny_model(root: Path) -> Path:
    """A saved tiny XLM-R masked LM with a word-level fast tokenizer."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stages.mlm import build_model

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(20)), "<mask>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=32,
    )
    root.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(root)
    torch.manual_seed(0)
    config = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    build_model(config, root, block_size=16).save_pretrained(root)
    return root


def fake_hub_cache(hf_home: Path, name: str) -> Path:
    """``name`` as huggingface_hub caches a download: models--org--name/{refs/main, snapshots/<sha>/}."""
    repo = hf_home / "hub" / ("models--" + name.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    make_tiny_model(repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo


REAL_SPEC = """\
name: hubtest
languages: [en, de]
stages:
  corpus:
    params: {{languages: "${{languages}}", source: hf, hf_path: json, hf_config: null,
             hf_data_files: "{text}/{{lang}}.jsonl", hf_id_column: null}}
  tokenizer:
    params: {{pretrained: {name}}}
  tokenize:
    inputs: {{corpus: corpus, tokenizer: tokenizer}}
  train:
    inputs: {{dataset: tokenize, tokenizer: tokenizer}}
    params: {{pretrained: {name}}}
  parallel:
    params: {{languages: [en, de], source: bible}}
  encode:
    inputs: {{model: train, parallel: parallel}}
  encode_base:
    stage: encode
    params: {{variant: base, base_model: nobody/missing-model}}
    inputs: {{model: train, parallel: parallel}}
"""


def test_real_stage_hooks_fetch_from_the_hub_cache_offline(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    hf_home = tmp_path / "hf"
    fake_hub_cache(hf_home, HUB_NAME)
    text = tmp_path / "text"
    text.mkdir()
    for lang in ("en", "de"):
        (text / f"{lang}.jsonl").write_text("".join(json.dumps({"text": f"{lang} doc {i}"}) + "\n" for i in range(5)))
    spec = tmp_path / "hub.yaml"
    spec.write_text(REAL_SPEC.format(text=text, name=HUB_NAME))
    caches = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_DATASETS_CACHE": str(hf_home / "datasets")}
    run = cli("prefetch", str(spec), cwd=tmp_path, env={**caches, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    out = run.stdout
    assert run.returncode == 1, out + run.stderr  # encode_base's model is nowhere
    cache = f"offline: found in the cache {hf_home / 'hub'}"
    assert f"fetched tokenizer {HUB_NAME} (25 tokens; {cache})" in out
    assert f"fetched model {HUB_NAME} (" in out and f" parameters; {cache})" in out
    assert f"fetched dataset json {text}/en.jsonl split train: 5 rows" in out
    assert f"fetched dataset json {text}/de.jsonl split train: 5 rows" in out
    assert "FAILED encode_base: ValueError: cannot load a model from 'nobody/missing-model'" in out
    assert "prefetched 4 items" in out  # tokenizer, train's model, 2 datasets; encode[full] has nothing
    assert "[4/5] encode\n  nothing to fetch\n" in out  # variant full: loads only its input model
    assert "nothing to fetch for: parallel, tokenize" in out
    assert "Traceback" not in out + run.stderr


# ---------------------------------------------------------------------------------------------
# GPU fail-fast and device naming


def test_a_job_asking_for_gpus_without_cuda_fails_at_once(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from stagekit import FakeContext, make_input, run_stage

    from stages.prune import PRUNE
    from stages.train import TRAIN

    host = socket.gethostname()
    ctx = FakeContext(tmp_path, gpus=1, job_label="prune[language=en]")
    missing = {"model": make_input(tmp_path / "none", "model"), "dataset": make_input(tmp_path / "none", "dataset")}
    with pytest.raises(RuntimeError) as e:  # before the (missing) model or data are read
        run_stage(PRUNE, {"language": "en"}, ctx, missing)
    assert str(e.value).startswith(f"job asked for 1 GPU but CUDA is not available on {host} (torch {torch.__version__}")
    assert str(e.value).endswith("install a CUDA build of torch (see README, Running on a cluster) or set "
                                 "executor.resources.prune.gpus: 0")
    with pytest.raises(RuntimeError, match=r"asked for 2 GPUs .* executor.resources.train.gpus: 0"):
        run_stage(TRAIN, {"pretrained": "x"}, FakeContext(tmp_path, gpus=2, job_label="train"), {})


def test_encode_asking_for_gpus_fails_unless_it_chose_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from stages.device import pick_device

    with pytest.raises(RuntimeError, match="executor.resources.encode_base.gpus: 0"):
        pick_device(1, "encode_base", "auto")
    with pytest.raises(RuntimeError, match="device=cuda but CUDA is not available"):
        pick_device(0, "encode", "cuda")
    assert pick_device(1, "encode", "cpu") == torch.device("cpu")
    assert capsys.readouterr().out == f"device: cpu ({torch.get_num_threads()} threads)\n"


def test_cuda_missing_message_says_why() -> None:
    from stages.device import cuda_missing_message

    cpu_build = cuda_missing_message(1, "train", "node7", "2.13.0+cpu", cuda_build=False, visible=None)
    assert cpu_build == (
        "job asked for 1 GPU but CUDA is not available on node7 (torch 2.13.0+cpu is a CPU-only build): install a "
        "CUDA build of torch (see README, Running on a cluster) or set executor.resources.train.gpus: 0"
    )
    hidden = cuda_missing_message(2, "prune", "node7", "2.13.0+cu126", cuda_build=True, visible="")
    assert "2 GPUs" in hidden and "(torch 2.13.0+cu126 sees no GPU, CUDA_VISIBLE_DEVICES='')" in hidden


def test_device_line_names_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from stages.device import device_line

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA H100 80GB HBM3 #{i}")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert device_line(torch.device("cuda", 2)) == "device: cuda:2 (NVIDIA H100 80GB HBM3 #2), 1 of 4 visible"


def test_model_stages_name_their_device_in_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    from stages.prune import load_eval_model

    model, device = load_eval_model(make_tiny_model(tmp_path / "model"), 0, "prune[language=en]")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.type == expected and capsys.readouterr().out.startswith(f"device: {expected}")
