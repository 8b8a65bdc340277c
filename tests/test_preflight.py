"""What limo/engine/preflight.py refuses before any process group exists: paths, benchmarks, and a
resume whose optimizer or schedule settings differ from its checkpoint's. (The exit code 2 of
train.py is tested end to end in test_recovery.py.)"""

import json

import pytest

from limo.data import synthetic
from limo.engine.config import ConfigError, load_config, resume_settings
from limo.engine.preflight import preflight
from tests.conftest import ROOT, shared_path


def _cfg(out, *overrides):
    return load_config(ROOT / "configs/demo.toml", [f"--train.output_dir={out}", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["--model.path=/nowhere/qwen"], "model.path='/nowhere/qwen': no such folder (nor a hub id like"),
    (["--model.path=./qwen"], "model.path='./qwen': no such folder"),
    (["--data.path=/nowhere/limo.jsonl"], "data.path='/nowhere/limo.jsonl': no such data file (.jsonl, .json, .parquet)"),
    (["--data.path=limo.jsonl"], "data.path='limo.jsonl': no such data file"),
    (["--data.tokenizer=/nowhere/tokenizer"], "data.tokenizer='/nowhere/tokenizer': no such folder"),
    (["--eval.benchmarks=aime25"], "eval.benchmarks: unknown benchmark 'aime25'; known: aime24, amc23, math500"),
    (["--eval.benchmarks=synthetic,aime24=/nowhere/aime.jsonl"],
     "eval.benchmarks: aime24=/nowhere/aime.jsonl: benchmark 'aime24': /nowhere/aime.jsonl/aime/test.jsonl does not exist"),
])  # fmt: skip
def test_a_path_or_benchmark_that_cannot_work_is_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(tmp_path, *overrides))
    assert message in str(e.value)


def test_a_model_that_cannot_be_known_offline_is_one_line(tmp_path, monkeypatch):
    """An unknown hub id the hub does not answer, or a config.json of another architecture."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(tmp_path / "out", "--model.path=someone/unknown-model"))
    assert "someone/unknown-model" in str(e.value) and "--model.preset=" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="unknown architecture"):
        preflight(_cfg(tmp_path / "out", f"--model.path={tmp_path / 'llama'}"))


def test_a_model_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match="the folder has no config.json"):
        preflight(_cfg(tmp_path / "out", f"--model.path={tmp_path / 'model'}"))


def test_hub_ids_existing_paths_and_known_benchmarks_pass(tmp_path, monkeypatch):
    """Offline, a known Qwen2.5 model id passes on its built-in config; a data hub id on its shape."""
    from limo.model.qwen2 import PRESETS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    shared_path("data", "eval", "math", "test.jsonl")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(PRESETS["tiny"].to_hf()))
    synthetic.byte_tokenizer().save_pretrained(str(tmp_path / "model"))
    (tmp_path / "limo.jsonl").write_text("")
    preflight(_cfg(tmp_path / "out", "--model.path=Qwen/Qwen2.5-32B-Instruct", "--data.path=GAIR/LIMO",
                   "--eval.benchmarks=synthetic,math500,aime24=hf:owner/ds/test.jsonl"))  # fmt: skip
    preflight(_cfg(tmp_path / "out", f"--model.path={tmp_path / 'model'}", f"--data.path={tmp_path / 'limo.jsonl'}",
                   f"--data.tokenizer={tmp_path / 'model'}"))  # fmt: skip


def test_a_resume_with_other_optimizer_or_schedule_settings_is_refused_naming_both_values(tmp_path):
    step = tmp_path / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "train_state.json").write_text(json.dumps({"step": 4, "settings": resume_settings(_cfg(tmp_path))}))
    preflight(_cfg(tmp_path))  # the same settings resume
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(tmp_path, "--optim.lr=1e-3", "--train.max_steps=10"))
    assert str(e.value) == (
        f"{step} was made with other optimizer/schedule settings (optim.lr: 0.003 there, 0.001 here; train.max_steps: 0 there, "
        "10 here). Rerun with the checkpoint's values, or train on with this run's: --checkpoint.override=optim.lr,train.max_steps"
    )
    preflight(_cfg(tmp_path, "--optim.lr=1e-3", "--train.max_steps=10", "--checkpoint.override=optim.lr,train.max_steps"))
    with pytest.raises(ConfigError, match=r"checkpoint.resume=false, but .* holds checkpoints of an earlier run \(newest: step-00000004\)"):
        preflight(_cfg(tmp_path, "--checkpoint.resume=false"))
