"""limo/engine/simulate.py: the real training step of a full-size model on fake tensors over a fake
process group, and the memory planner held to it."""

import json
import subprocess
import sys

import pytest

from limo.engine.config import load_config
from limo.engine.simulate import simulate
from limo.model.qwen2 import ModelArgs
from tests.conftest import ROOT


def _model_folder(tmp_path, vocab, tied=False, layers=3):
    """A config.json alone: the simulation never reads weights."""
    folder = tmp_path / f"model-{vocab}-{tied}-{layers}"
    folder.mkdir(exist_ok=True)
    args = ModelArgs(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_layers=layers, num_heads=8, num_kv_heads=2,
                     tie_word_embeddings=tied)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(args.to_hf()))
    return folder


CASES = [  # checkpointing, world size, HSDP replicas, AdamW moments, vocabulary, tied
    ("full", 1, 1, "bfloat16", 1024, False),
    ("full", 4, 1, "float32", 32000, False),
    ("selective", 8, 2, "bfloat16", 1024, False),
    ("none", 2, 1, "float32", 1024, False),
    ("full", 8, 1, "bfloat16", 32000, True),
    ("selective", 16, 1, "float32", 1024, False),  # 5.3% over before the last layer's in-flight gradients were its MLP's
    ("full", 64, 8, "bfloat16", 32000, False),  # 8 nodes x 8 with HSDP, as the scale-out table's last row
]


@pytest.mark.parametrize("ac, world, replicas, moments, vocab, tied", CASES)
def test_the_planner_is_within_5_percent_of_the_simulated_step(tmp_path, ac, world, replicas, moments, vocab, tied):
    """Two full micro-batches (the second one's backward meets the first's gradients), the GPU's
    ops; the planner's tensors against the tracker's peak. What the tracker cannot see (the
    allocator, a prefetch in flight on its own CUDA stream) is on separate lines of the plan."""
    cfg = load_config(None, [f"--model.path={_model_folder(tmp_path, vocab, tied)}", f"--parallel.activation_checkpointing={ac}",
                             f"--parallel.dp_replicate={replicas}", f"--optim.state_dtype={moments}", "--train.dtype=bfloat16",
                             "--data.max_tokens=1024", "--data.tokens_per_microbatch=2048"])  # fmt: skip
    sim = simulate(cfg, world, full_batches=2)
    assert sim.micro_batches == [2048, 2048] and sim.world_size == world and sim.num_layers == 3
    assert sum(sim.breakdown.values()) == pytest.approx(sim.peak_gib)
    assert abs(sim.planner_error) <= 0.05, (sim.peak_gib, sim.planned_gib, sim.breakdown, sim.plan["breakdown"], sim.peak_module)
    assert sim.peak_module.startswith(("FSDPQwen2.layers.", "FSDPQwen2.lm_head")), sim.peak_module  # a layer's backward or the loss head


def test_collectives_are_counted_by_the_bytes_fsdp_moves(tmp_path):
    """Per micro-batch, FSDP2 gathers every parameter in bf16 for the forward and again for the
    backward, and reduce-scatters every gradient in fp32; HSDP all-reduces the shards' gradients
    across replicas."""
    folder = _model_folder(tmp_path, 1024)
    cfg = load_config(None, [f"--model.path={folder}", "--train.dtype=bfloat16", "--data.max_tokens=512",
                             "--data.tokens_per_microbatch=1024", "--parallel.dp_replicate=2"])  # fmt: skip
    sim = simulate(cfg, 4, full_batches=2)
    n = ModelArgs.from_hf(json.loads((folder / "config.json").read_text())).num_params()
    assert sim.collectives["all_gather"] == pytest.approx(2 * 2 * n * 2, rel=0.01)  # 2 micro-batches x (fwd + bwd) x bf16
    assert sim.collectives["reduce_scatter"] == pytest.approx(2 * n * 4, rel=0.01)  # 2 micro-batches x fp32
    # each micro-batch's shard of gradients (1/2 of the model, fp32) across the 2 replicas, and the step's loss
    assert sim.collectives["all_reduce"] == pytest.approx(2 * n / 2 * 4, abs=64)


def test_the_command_line_prints_one_json_object_and_names_bad_input():
    out = subprocess.run([sys.executable, "-m", "limo.engine.simulate", "--config", "configs/demo.toml", "--world-size", "2", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    keys = {"peak_gib", "planned_gib", "breakdown", "peak_module", "collectives", "world_size", "num_layers", "seconds"}
    assert keys <= set(result) and result["world_size"] == 2 and result["num_layers"] == 4
    bad = subprocess.run([sys.executable, "-m", "limo.engine.simulate", "--config", "configs/demo.toml", "--world-size", "3",
                          "--parallel.dp_replicate=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "parallel.dp_replicate=2 does not divide the world size 3" in bad.stderr


@pytest.mark.parametrize("cp, world, tokens", [(2, 4, 4096), (4, 8, 8192)])
def test_the_planner_is_within_5_percent_of_a_context_parallel_step(tmp_path, cp, world, tokens):
    """parallel.cp: each rank's 1/cp of two micro-batches of one long sample each, the K/V gathered
    in every layer; the planner's tensors against the tracker's peak, and the gathers' bytes."""
    folder = _model_folder(tmp_path, 1024)
    cfg = load_config(None, [f"--model.path={folder}", "--train.dtype=bfloat16", f"--data.max_tokens={tokens}",
                             f"--data.tokens_per_microbatch={tokens}", f"--parallel.cp={cp}"])  # fmt: skip
    sim = simulate(cfg, world, full_batches=2)
    assert abs(sim.planner_error) <= 0.05, (sim.peak_gib, sim.planned_gib, sim.breakdown, sim.plan["breakdown"], sim.peak_module)
    n = ModelArgs.from_hf(json.loads((folder / "config.json").read_text())).num_params()
    kv = 3 * tokens * 2 * 2 * 64 * 2  # 3 layers x the micro-batch's K/V ([T, 2 x 2 heads, 64] bf16)
    # FSDP's bf16 gathers (forward and backward) plus, per micro-batch, the K/V gathers of forward and recompute
    assert sim.collectives["all_gather"] == pytest.approx(2 * 2 * n * 2 + 2 * 2 * kv, rel=0.01)
