"""The memory planner: its activation model against saved-tensor hooks, its arithmetic, its CLI."""

import json
import subprocess
import sys

import pytest
import torch

from engine.config import load_config
from engine.memory import H100_80GB_GIB, layer_activation_bytes_per_token, plan_memory
from benchmarks.regression import activation_bytes_per_token_layer
from engine.model import PRESETS, ModelArgs
from tests.conftest import ROOT


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_activations_match_what_autograd_keeps_alive(dtype):
    """The planner's per-layer bytes equal the storages a forward leaves alive for backward,
    counted by benchmarks/regression.py (attention kept as flash-attn keeps it), odd sizes."""
    args = ModelArgs(vocab_size=96, hidden_size=40, intermediate_size=77, num_layers=2, num_heads=5, num_kv_heads=1)
    lengths = [37, 11, 23]
    measured = activation_bytes_per_token_layer(args, lengths, checkpointing=False, dtype=dtype)
    assert measured == layer_activation_bytes_per_token(args, dtype.itemsize)
    # With checkpointing a layer keeps only its input.
    assert activation_bytes_per_token_layer(args, lengths, checkpointing=True, dtype=dtype) == args.hidden_size * dtype.itemsize


def test_breakdown_sums_to_the_peak_and_the_limo_recipe_fits():
    cfg = load_config(ROOT / "configs/limo_qwen2.5_32b_8xh100.toml", ["--model.path=none", "--model.preset=qwen2.5-32b"])
    plan = plan_memory(cfg, PRESETS["qwen2.5-32b"], 8, H100_80GB_GIB)
    assert sum(plan.breakdown.values()) == pytest.approx(plan.peak_gib)
    assert plan.fits and plan.peak_gib < plan.capacity_gib
    # The choices it rests on: bf16 AdamW moments and full checkpointing. Without either it does not fit.
    fp32_states = load_config(ROOT / "configs/limo_qwen2.5_32b_8xh100.toml",
                              ["--model.path=none", "--model.preset=qwen2.5-32b", "--optim.state_dtype=float32"])
    assert not plan_memory(fp32_states, PRESETS["qwen2.5-32b"], 8, H100_80GB_GIB).fits
    no_ac = load_config(ROOT / "configs/limo_qwen2.5_32b_8xh100.toml",
                        ["--model.path=none", "--model.preset=qwen2.5-32b", "--parallel.activation_checkpointing=none"])
    assert not plan_memory(no_ac, PRESETS["qwen2.5-32b"], 8, H100_80GB_GIB).fits


def test_static_state_scales_with_the_shard_count():
    cfg = load_config(ROOT / "configs/demo.toml")
    one, four = (plan_memory(cfg, PRESETS["tiny"], w, 80.0) for w in (1, 4))
    key = "params (sharded fp32)"
    assert one.breakdown[key] == pytest.approx(4 * four.breakdown[key])
    assert one.breakdown[key] * 2**30 == PRESETS["tiny"].num_params() * 4


def test_command_line_json(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "engine.memory", "--config", "configs/limo_qwen2.5_32b_8xh100.toml", "--json",
         "--model.path=none", "--model.preset=qwen2.5-32b"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    plan = json.loads(out.stdout)
    assert set(plan) == {"peak_gib", "capacity_gib", "fits", "moment", "breakdown"}
    assert plan["fits"] is True and sum(plan["breakdown"].values()) == pytest.approx(plan["peak_gib"])
    bad = subprocess.run([sys.executable, "-m", "engine.memory", "--config", "configs/demo.toml", "--train.dtype=fp8"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "train.dtype = 'fp8' is not one of" in bad.stderr
