"""The memory planner: its activation model against saved-tensor hooks, its arithmetic, its CLI, and
real CPU runs of limo/engine/train.py held to it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from limo import kernels
from benchmarks.regression import activation_bytes_per_token_layer
from limo.engine.config import load_config
from limo.engine.memory import H100_80GB_GIB, ExecutionPath, layer_activation_bytes_per_token, plan_memory
from limo.model.qwen2 import PRESETS, ModelArgs, VarlenContext, build_model, rotary_cos_sin
from tests.conftest import ROOT, TORCHRUN


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_paths_layer_activations_match_saved_tensor_hooks(backend, dtype):
    """On the CPU's own path (per-sample SDPA, which PyTorch's CPU flash kernel runs, and either
    kernel backend) the planner's per-layer bytes equal what autograd saves, storage by storage."""
    args = ModelArgs(vocab_size=96, hidden_size=40, intermediate_size=77, num_layers=1, num_heads=5, num_kv_heads=1)
    lengths = [37, 11, 23]
    T = sum(lengths)
    previous = kernels.backend("cpu")
    kernels.set_backend(backend)
    try:
        layer = build_model(args, device="cpu", dtype=dtype).layers[0]
        cu = torch.tensor([0, 37, 48, 71], dtype=torch.int32)
        h = torch.randn(T, args.hidden_size, dtype=dtype, requires_grad=True)
        cos, sin = rotary_cos_sin(torch.arange(T), args.head_dim, args.rope_theta, dtype)
        fixed = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), cos, sin)}
        saved: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in fixed:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(h, cos, sin, VarlenContext(cu, max(lengths)))
    finally:
        kernels.set_backend(previous)
    path = ExecutionPath("cpu", backend, "reference")
    assert sum(saved.values()) == T * layer_activation_bytes_per_token(args, dtype.itemsize, path)


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
        [sys.executable, "-m", "limo.engine.memory", "--config", "configs/limo_qwen2.5_32b_8xh100.toml", "--json",
         "--model.path=none", "--model.preset=qwen2.5-32b"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    plan = json.loads(out.stdout)
    assert {"peak_gib", "capacity_gib", "fits", "moment", "breakdown", "path", "config_source"} <= set(plan)
    assert plan["fits"] is True and sum(plan["breakdown"].values()) == pytest.approx(plan["peak_gib"])
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}  # no network, no cache
    out = subprocess.run([sys.executable, "-m", "limo.engine.memory", "--config", "configs/limo_qwen2.5_32b_8xh100.toml", "--json"],
                         cwd=ROOT, env=offline, capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout)
    assert plan["fits"] and "built-in config of Qwen/Qwen2.5-32B-Instruct" in plan["config_source"]
    unknown = subprocess.run([sys.executable, "-m", "limo.engine.memory", "--config", "configs/demo.toml", "--model.path=someone/unknown"],
                             cwd=ROOT, env=offline, capture_output=True, text=True)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "--model.preset=" in unknown.stderr
    bad = subprocess.run([sys.executable, "-m", "limo.engine.memory", "--config", "configs/demo.toml", "--train.dtype=fp8"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "train.dtype = 'fp8' is not one of" in bad.stderr


# ---------------------------------------------------------------------------------------------
# The plan held to real CPU runs of limo/engine/train.py


@pytest.fixture(scope="module")
def qwen_vocab_folder(tmp_path_factory):
    """A transformers Qwen2 folder with Qwen2.5's real 152,064-token vocabulary and tokenizer
    (2 layers, hidden 64), and a LIMO-format .jsonl of ~430-token samples in that tokenizer."""
    import shutil

    from limo.data import synthetic
    from tests.conftest import made_once, random_hf_qwen2, shared_path

    def make(root: Path) -> None:
        hf = random_hf_qwen2(seed=7, vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        hf.save_pretrained(root / "model")
        for f in shared_path("data", "tokenizers", "qwen2.5").iterdir():
            if f.suffix in (".json", ".txt", ".jinja"):
                shutil.copy(f, root / "model" / f.name)
        records = [{**r, "solution": (r["solution"] + "\n") * 8} for r in synthetic.train_split(64, seed=3)]
        (root / "limo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    root = made_once(tmp_path_factory, "qwen-vocab", make)
    return root / "model", root / "limo.jsonl"


@pytest.mark.parametrize("nproc, extra", [
    (2, []),  # the demo recipe: fp32, no checkpointing, 5,120 tokens per micro-batch
    (1, ["--parallel.activation_checkpointing=full", "--data.tokens_per_microbatch=8192"]),
], ids=["2-ranks-demo", "1-rank-full-ac-8k"])
def test_a_152k_vocab_cpu_run_stays_small_and_the_plan_holds(qwen_vocab_folder, tmp_path, nproc, extra):
    """Fine-tuning a 152k-vocab folder on CPU: each process stays under 3 GB (it reached 10-13 GB
    when the torch loss built [T, V] logits), and each rank's peak RSS growth over its baseline
    (RSS before the model is built) is within 25% of the planner's growth, which it wrote in
    memory.json beside the measurement."""
    folder, data = qwen_vocab_folder
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "--nproc_per_node", str(nproc), "limo/engine/train.py", "--config",
           "configs/demo.toml", f"--model.path={folder}", f"--data.path={data}", "--data.max_tokens=1024", "--data.samples_per_step=16", "--train.max_steps=2",
           "--eval.benchmarks=", "--checkpoint.export_hf=false", f"--train.output_dir={out}", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS_BACKEND": "torch"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "memory.json").read_text())
    assert report["plan"]["path"] == {"device": "cpu", "kernels": "torch", "attention": "reference"}
    assert len(report["measured"]) == nproc
    for rank in report["measured"]:
        assert rank["peak_gib"] < 3.0 and rank["startup_peak_gib"] < 3.0, rank  # the training's peak, and the data's before it
        assert abs(rank["growth_gib"] / report["plan"]["growth_gib"] - 1) <= 0.25, (rank, report["plan"]["growth_gib"])


def test_async_saves_staging_is_planned_in_host_memory():
    """checkpoint.async_save stages each rank's shards of the checkpoint: pinned host memory beside
    a GPU (its own line, not the device's peak), the same RAM as the training on a CPU."""
    from limo.engine.memory import STAGING, checkpoint_bytes
    from limo.model.qwen2 import PRESETS

    args = PRESETS["qwen2.5-32b"]
    sync = plan_memory(load_config("configs/limo_qwen2.5_32b_8xh100.toml"), args, 8, 80.0)
    cfg = load_config("configs/limo_qwen2.5_32b_8xh100.toml", ["--checkpoint.async_save=true"])
    gpu = plan_memory(cfg, args, 8, 80.0)
    assert gpu.peak_gib == sync.peak_gib and gpu.host == {STAGING: pytest.approx(checkpoint_bytes(cfg, args) / 8 / 2**30)}
    assert 30 < gpu.host[STAGING] < 31 and f"host memory per rank: {STAGING}" in gpu.report()  # 262 GB over 8 ranks
    cpu_cfg = load_config("configs/demo.toml", ["--checkpoint.async_save=true"])
    cpu = plan_memory(cpu_cfg, PRESETS["tiny"], 2, 64.0, path=ExecutionPath.default_for("cpu"))
    base = plan_memory(load_config("configs/demo.toml"), PRESETS["tiny"], 2, 64.0, path=ExecutionPath.default_for("cpu"))
    assert cpu.breakdown[STAGING] == pytest.approx(checkpoint_bytes(cpu_cfg, PRESETS["tiny"]) / 2 / 2**30)
    assert cpu.peak_gib == pytest.approx(base.peak_gib + cpu.breakdown[STAGING]) and not cpu.host
