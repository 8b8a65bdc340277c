"""The memory planner: its activation model against saved-tensor hooks, its arithmetic, its CLI."""

import json
import subprocess
import sys

import pytest
import torch

from engine.config import load_config
from engine.memory import H100_80GB_GIB, layer_activation_bytes_per_token, plan_memory
from engine.model import PRESETS, ModelArgs, VarlenContext, build_model
from tests.conftest import ROOT


class _FlashContract(VarlenContext):
    """Attention whose saved tensors are flash-attn's contract (q, k, v, out, an fp32 lse per
    head) instead of what the CPU reference happens to save. `seen` maps storage -> bytes, so
    a tensor saved twice (out, and o_proj's view of it) counts once."""

    def __init__(self, cu_seqlens, max_seqlen, seen):
        super().__init__(cu_seqlens, max_seqlen)
        self.seen = seen

    def attention(self, layer, q, k, v):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # hide the reference's own
            out = super().attention(layer, q, k, v)
        for t in (q, k, v, out):
            self.seen[t.data_ptr()] = t
        self.seen["lse"] = torch.empty(q.shape[:2], dtype=torch.float32)
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_activations_match_saved_tensor_hooks(dtype):
    args = ModelArgs(vocab_size=96, hidden_size=64, intermediate_size=176, num_layers=1, num_heads=4, num_kv_heads=2)
    model = build_model(args, device="cpu", dtype=dtype)
    model.init_weights()
    T = 37
    h = torch.randn(T, args.hidden_size, dtype=dtype, requires_grad=True)
    from engine.model import rotary_cos_sin

    cos, sin = rotary_cos_sin(torch.arange(T), args.head_dim, args.rope_theta, dtype)
    seen: dict[int | str, torch.Tensor] = {}  # storage -> tensor, held so no address is reused while counting
    ctx = _FlashContract(torch.tensor([0, T], dtype=torch.int32), T, seen)

    def pack(t):
        if t.data_ptr() not in seen and not isinstance(t, torch.nn.Parameter) and t.shape[:1] == (T,):
            seen[t.data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.layers[0](h, cos, sin, ctx)  # noqa: F841 (keeps the graph, and what it saved, alive)
    cos_sin = 2 * T * args.head_dim * dtype.itemsize  # shared by every layer, not per layer
    measured = sum(t.numel() * t.element_size() for t in seen.values()) - cos_sin
    assert measured == layer_activation_bytes_per_token(args, dtype.itemsize) * T


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
