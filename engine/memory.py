"""Per-GPU peak memory of a training plan, before anything is allocated.

    python -m engine.memory --config FILE [--world-size 8] [--capacity-gib 79.6] [--json] [--section.key=value ...]

The model follows one optimizer step of the FSDP2 plan (engine/parallel.py) on one rank and
takes the larger of its three high-water marks:
  head forward / backward: every layer's saved activations are alive, the head's weight is
            gathered, and the fused cross-entropy holds its logits chunk (forward) or its fp32
            gradients next to their casts (end of backward);
  recompute: the backward of the last checkpointed layer: its activations are recomputed next to
            the saved ones, with the gathered block, the prefetched one and the gradient buffers
            of the reduce-scatters in flight.
Static state (sharded fp32 master weights and gradients, AdamW moments) is there at both.
The breakdown (component -> GiB) sums to the peak; "allocator" is the caching allocator's
fragmentation, taken as 5% of everything else. The CUDA context, cuBLAS and NCCL workspaces
live outside PyTorch's allocator: they are subtracted from the device's memory as "reserved".
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch

from engine.config import Config, ConfigError, load_config
from engine.model import PRESETS, ModelArgs
from kernels.cross_entropy import chunk_tokens

GIB = 2**30
H100_80GB_GIB = 81559 * 2**20 / GIB  # 79.6 GiB as nvidia-smi reports the 80 GB part
RUNTIME_RESERVED_GIB = 2.5  # CUDA context + cuBLAS workspaces + NCCL buffers (outside the allocator)
FRAGMENTATION = 0.05


@dataclass
class MemoryPlan:
    peak_gib: float
    capacity_gib: float
    fits: bool
    moment: str  # which high-water mark is the peak
    breakdown: dict[str, float]  # GiB, sums to peak_gib

    def report(self) -> str:
        width = max(map(len, self.breakdown))
        lines = [f"  {k:<{width}}  {v:8.2f} GiB" for k, v in self.breakdown.items()]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'peak':<{width}}  {self.peak_gib:8.2f} GiB  ({self.moment}) of {self.capacity_gib:.1f} GiB usable: {verdict}")
        return "\n".join(lines)


def layer_activation_bytes_per_token(args: ModelArgs, compute_bytes: int) -> int:
    """Bytes one decoder layer saves for backward per token, without checkpointing.

    Counted tensor by tensor for the kernels the engine runs (tests/test_memory.py measures it
    with saved-tensor hooks): the input norm saves its input and its output (the q/k/v
    projections' input); attention (flash/varlen) saves rotated q, k, v, its output and the
    fp32 log-sum-exp; the fused residual norm saves the sum and its output (the MLP's input);
    SwiGLU saves gate, up, silu(gate) and their product; each norm saves an fp32 rstd.
    """
    H, I = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    elements = 4 * H + 2 * q + 2 * kv + 4 * I
    fp32 = 2 + args.num_heads  # two rstd + one lse per head
    return elements * compute_bytes + fp32 * 4


def device_capacity_gib(device: torch.device) -> tuple[float, float]:
    """(memory of the device, what lives outside PyTorch's allocator) in GiB.

    On CPU the processes of one node share its RAM, and there is no CUDA runtime to set aside.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB, RUNTIME_RESERVED_GIB
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return host / int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 0.0


def plan_memory(cfg: Config, args: ModelArgs, world_size: int, capacity_gib: float, reserved_gib: float = RUNTIME_RESERVED_GIB) -> MemoryPlan:
    """The per-GPU peak of `cfg` for a model of `args` on `world_size` GPUs of `capacity_gib`."""
    p = cfg.parallel
    if world_size % p.dp_replicate:
        raise ConfigError(f"parallel.dp_replicate={p.dp_replicate} does not divide the world size {world_size}")
    shard = world_size // p.dp_replicate
    cb = 2 if cfg.train.dtype == "bfloat16" else 4  # compute (gathered parameter) bytes
    state_bytes = 2 if cfg.optim.state_dtype == "bfloat16" else 4
    T, H, V, L = cfg.data.tokens_per_microbatch, args.hidden_size, args.vocab_size, args.num_layers

    n_total = args.num_params()
    n_head = 0 if args.tie_word_embeddings else V * H
    n_block = (n_total - V * H - n_head - H) // L
    on_gpu = 0 if p.cpu_offload else 1

    static = {
        "params (sharded fp32)": on_gpu * n_total * 4 / shard,
        "grads (sharded fp32)": on_gpu * n_total * 4 / shard,
        "optimizer (sharded moments)": on_gpu * 2 * n_total * state_bytes / shard,
    }
    per_layer = layer_activation_bytes_per_token(args, cb) * T
    boundary = T * H * cb  # what a checkpointed layer keeps: its input
    if p.activation_checkpointing == "full":
        checkpointed = L
    elif p.activation_checkpointing == "selective":
        checkpointed = math.ceil(L / 2)
    else:
        checkpointed = 0
    saved_all = checkpointed * boundary + (L - checkpointed) * per_layer
    # Gathered weights: with reshard_after_forward every block is freed after use; otherwise
    # (ZeRO-2) all stay gathered until backward.
    blocks_gathered = (1 + p.prefetch) if p.reshard_after_forward else L
    all_gather_staging = n_block * cb  # a prefetch's flat all-gather output before copy-out
    block_grads = n_block * cb + 2 * n_block * 4  # unsharded grads + fp32 reduce-scatter inputs (current, in flight)

    chunk = chunk_tokens(T, V, torch.bfloat16 if cb == 2 else torch.float32)  # the kernel's own rule
    gathered_head = (n_head or V * H) * cb + n_block * cb  # the head, and the last block prefetched for backward
    ce_fp32 = V * H * 4 + T * H * 4  # fused cross-entropy's fp32 dweight and dhidden
    head_forward = {
        **static,
        "gathered weights (head + next block)": gathered_head,
        "saved activations": saved_all,
        "loss head (logits chunk + fp32 grads)": chunk * V * cb + ce_fp32,
    }
    head_backward = {
        **static,
        "gathered weights (head + next block)": gathered_head,
        "saved activations": saved_all,
        "loss head (fp32 grads + casts)": ce_fp32 + V * H * cb + T * H * cb,
    }
    mlp_grads = 3 * T * args.intermediate_size * cb + 2 * T * H * cb  # d(product), d(gate), d(up); dh in and out
    recompute = {
        **static,
        "gathered weights (blocks in flight)": blocks_gathered * n_block * cb + all_gather_staging,
        "saved activations": saved_all,
        "block gradients + reduce-scatter": block_grads,
        "recomputed layer + its gradients": (per_layer if checkpointed else 0) + mlp_grads,
    }
    moments = {"head forward": head_forward, "head backward": head_backward, "last-layer recompute": recompute}
    moment, parts = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    parts = dict(parts)
    parts["allocator"] = FRAGMENTATION * sum(parts.values())
    breakdown = {k: v / GIB for k, v in parts.items()}
    peak = sum(breakdown.values())
    usable = capacity_gib - reserved_gib
    return MemoryPlan(peak_gib=peak, capacity_gib=usable, fits=peak <= usable, moment=moment, breakdown=breakdown)


def checkpoint_bytes(cfg: Config, args: ModelArgs) -> int:
    """Bytes of one DCP checkpoint on disk, all ranks together: the fp32 master weights and both
    AdamW moments, the state the plan counts as static (Qwen2.5-32B with bf16 moments: 262 GB)."""
    state_bytes = 2 if cfg.optim.state_dtype == "bfloat16" else 4
    return args.num_params() * (4 + 2 * state_bytes)


def model_args(cfg: Config) -> ModelArgs:
    if cfg.model.preset:
        return PRESETS[cfg.model.preset]
    from engine.weights import resolve_model_dir

    folder = resolve_model_dir(cfg.model.path, config_only=True)
    return ModelArgs.from_hf(json.loads((folder / "config.json").read_text()), source=str(folder / "config.json"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m engine.memory", description="Per-GPU peak memory of a training plan.")
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, default=8, help="GPUs in the run (default 8)")
    p.add_argument("--capacity-gib", type=float, default=H100_80GB_GIB, help=f"memory of one GPU (default {H100_80GB_GIB:.1f}, an 80 GB H100)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        plan = plan_memory(cfg, model_args(cfg), args.world_size, args.capacity_gib)
    except ValueError as e:  # ConfigError, WeightsError, ArchitectureError: all name what is wrong
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(plan)))
    else:
        print(f"{args.config} on {args.world_size} GPUs of {args.capacity_gib:.1f} GiB:\n{plan.report()}")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
