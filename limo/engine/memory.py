"""Per-rank peak memory of a training plan, before anything is allocated, for the path that runs.

    python -m limo.engine.memory --config FILE [--world-size 8] [--device cuda|cpu] [--capacity-gib G] [--json] [--section.key=value ...]

The model follows one optimizer step of the FSDP2 plan (limo/engine/sharding.py) on one rank and
takes the largest of its high-water marks:
  head forward / backward: every layer's saved activations are alive, the head's weight is
            gathered, and the fused cross-entropy holds its logits chunk (forward) or its fp32
            gradients next to their casts (end of backward);
  layer L-1 / L-2 backward: a layer's activations, recomputed from its kept input when
            checkpointed, next to what the layers before it keep, with the gathered block and the
            block gradients in flight (unsharded in the first; from the second on, the previous
            layer's fp32 reduce-scatter input);
  optimizer step (bf16 moments): the fp32 copies of the largest shard's two moments.
Static state (sharded fp32 master weights and gradients, AdamW moments) is there at each.
limo/engine/simulate.py holds the plan to the step run on fake tensors at full size.

It plans the path a run takes (`ExecutionPath`): CUDA or CPU, the Triton kernels or their torch
twins, flash / torch varlen / per-sample SDPA attention. Those change what a layer saves for
backward, what the loss head holds beside its logits chunk, the chunk itself (a CPU's budget is
smaller) and what lives outside the tensors:
  CUDA: the caching allocator's fragmentation, 5% of the tensors; the CUDA context, cuBLAS and
        NCCL workspaces, outside the allocator, are subtracted from the device as "reserved".
  CPU:  the ranks of one host share its RAM; each process starts from a baseline of its own
        (interpreter, libraries, tokenizer, data: measured by train.py before the model is
        built), and glibc's heap keeps some freed memory (CPU_ALLOCATOR_SLACK of the tensors).
The breakdown (component -> GiB) sums to the peak.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from limo.engine.config import Config, ConfigError, load_config
from limo.kernels.cross_entropy import chunk_tokens
from limo.model.qwen2 import ModelArgs
from limo.tools.dtypes import dtype_of

GIB = 2**30
H100_80GB_GIB = 81559 * 2**20 / GIB  # 79.6 GiB as nvidia-smi reports the 80 GB part
RUNTIME_RESERVED_GIB = 2.5  # CUDA context + cuBLAS workspaces + NCCL buffers (outside the allocator)
FRAGMENTATION = 0.05  # CUDA caching allocator
# glibc keeps freed mid-size blocks in its heap, so a CPU process's RSS runs above its live tensors
# (measured by the 152k-vocabulary CPU runs of tests/test_memory.py: 8-14% over the tensors the plan counts).
CPU_ALLOCATOR_SLACK = 0.10
# What `python -m limo.engine.memory --device cpu` assumes a training process holds before its model
# exists (measured here: Python, torch, transformers, a Qwen tokenizer and a small dataset: 0.41-0.42
# GiB). limo/engine/train.py measures its own instead.
CPU_PROCESS_BASELINE_GIB = 0.42


@dataclass(frozen=True)
class ExecutionPath:
    """The device and kernels a run uses, as far as memory is concerned."""

    device: str = "cuda"  # "cuda" | "cpu"
    kernels: str = "triton"  # "triton" | "torch": kernels.dispatch.backend(device)
    attention: str = "flash"  # "flash" | "torch_varlen" | "reference": kernels.dispatch.attention_backend

    @classmethod
    def of(cls, device_type: str, dtype: torch.dtype) -> ExecutionPath:
        """The path the kernels package chooses for tensors of this device and dtype (and logs)."""
        from limo.kernels.dispatch import attention_backend, backend

        return cls(device_type, backend(device_type), attention_backend(device_type, dtype))

    @classmethod
    def default_for(cls, device_type: str) -> ExecutionPath:
        """What a machine of this kind runs by default: Triton + flash on CUDA, the torch path on CPU."""
        return cls() if device_type == "cuda" else cls("cpu", "torch", "reference")


@dataclass
class MemoryPlan:
    peak_gib: float
    capacity_gib: float
    fits: bool
    moment: str  # which high-water mark is the peak
    breakdown: dict[str, float]  # GiB, sums to peak_gib
    path: dict[str, str] = field(default_factory=dict)  # the ExecutionPath planned for
    baseline_gib: float = 0.0  # part of the peak the process held before its model existed (CPU)
    config_source: str = ""  # where the model's architecture came from
    host: dict[str, float] = field(default_factory=dict)  # GiB of host memory per rank beside a GPU's (async saves' pinned staging)

    @property
    def growth_gib(self) -> float:
        """The peak above the process's baseline: what the training state adds."""
        return self.peak_gib - self.baseline_gib

    def report(self) -> str:
        width = max(map(len, self.breakdown))
        lines = [f"  {k:<{width}}  {v:8.2f} GiB" for k, v in self.breakdown.items()]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'peak':<{width}}  {self.peak_gib:8.2f} GiB  ({self.moment}) of {self.capacity_gib:.1f} GiB usable: {verdict}")
        for k, v in self.host.items():
            lines.append(f"  host memory per rank: {k} {v:.2f} GiB")
        if self.path:
            lines.append(f"  planned for {self.path['device']}: kernels {self.path['kernels']}, attention {self.path['attention']}")
        return "\n".join(lines)


def layer_activation_bytes_per_token(args: ModelArgs, compute_bytes: int, path: ExecutionPath = ExecutionPath()) -> int:
    """Bytes one decoder layer saves for backward per token, without checkpointing.

    Counted tensor by tensor for the kernels the path runs (tests/test_memory.py measures each
    with saved-tensor hooks). Triton + flash: the input norm saves its input and its output (the
    q/k/v projections' input); attention saves rotated q, k, v, its output and the fp32
    log-sum-exp; the fused residual norm saves the sum and its output (the MLP's input); SwiGLU
    saves gate, up, silu(gate) and their product; each norm saves an fp32 rstd. The torch
    RMSNorm also keeps its fp32 normalised input (one [T, H] fp32 per norm); the per-sample SDPA
    reference keeps each sample's output beside the stream's (one more [T, Hq * D]).
    """
    H, I = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    elements = 4 * H + 2 * q + 2 * kv + 4 * I
    if path.attention == "reference":
        elements += q
    fp32 = 2 + args.num_heads  # two rstd + one lse per head
    if path.kernels == "torch":
        fp32 += 2 * H
    return elements * compute_bytes + fp32 * 4


def device_capacity_gib(device: torch.device) -> tuple[float, float]:
    """(memory of the device, what lives outside PyTorch's allocator) in GiB.

    On CPU the processes of one node share its RAM, and there is no CUDA runtime to set aside.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB, RUNTIME_RESERVED_GIB
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return host / int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 0.0


STAGING = "async-save staging (this rank's shards of the checkpoint)"


def plan_memory(
    cfg: Config,
    args: ModelArgs,
    world_size: int,
    capacity_gib: float,
    reserved_gib: float | None = None,
    path: ExecutionPath = ExecutionPath(),
    baseline_gib: float | None = None,
) -> MemoryPlan:
    """The per-rank peak of `cfg` for a model of `args` on `world_size` ranks of `capacity_gib`.

    `reserved_gib` (default: the CUDA runtime on a GPU, nothing on a CPU) is taken off the
    capacity. `baseline_gib` is a CPU process's own memory before its model exists (default
    CPU_PROCESS_BASELINE_GIB on a CPU, 0 on a GPU, where the allocator starts empty).
    """
    p = cfg.parallel
    if world_size % p.dp_replicate:
        raise ConfigError(f"parallel.dp_replicate={p.dp_replicate} does not divide the world size {world_size}")
    if world_size % p.cp:
        raise ConfigError(f"parallel.cp={p.cp} does not divide the world size {world_size}")
    on_cpu = path.device != "cuda"
    reserved_gib = (0.0 if on_cpu else RUNTIME_RESERVED_GIB) if reserved_gib is None else reserved_gib
    baseline_gib = (CPU_PROCESS_BASELINE_GIB if on_cpu else 0.0) if baseline_gib is None else baseline_gib
    sizes = _Sizes.of(cfg, args, world_size // p.dp_replicate, path)
    moments = {**_loss_head_moments(sizes, path), **_layer_backward_moments(sizes, cfg)}
    if cfg.optim.state_dtype != "float32":  # ours: fp32 copies of one parameter's two moments at a time
        largest_shard = max(args.vocab_size * args.hidden_size, args.intermediate_size * args.hidden_size) / sizes.shard
        moments["optimizer step"] = {**sizes.static, "optimizer temporaries (largest shard's fp32 moments)": 2 * largest_shard * 4}
    moment, parts = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    parts = {k: v for k, v in parts.items() if v}
    # What the tensors alone do not show, on their own lines: the caching allocator's fragmentation
    # (a CPU's heap slack), and on a GPU the next block's all-gather, issued ahead on its own stream
    # (explicit prefetch), whose output is alive while this block computes.
    if not on_cpu and p.prefetch and "backward" in moment and moment.startswith("layer"):
        parts["prefetched blocks' all-gather outputs (CUDA streams)"] = p.prefetch * sizes.n_block * sizes.cb
    parts["allocator"] = (CPU_ALLOCATOR_SLACK if on_cpu else FRAGMENTATION) * sum(parts.values())
    breakdown = {k: v / GIB for k, v in parts.items()}
    # checkpoint.async_save: each rank stages its shards of the checkpoint (fp32 weights and the
    # moments) in host memory while the background write runs: pinned host memory beside a GPU,
    # the same RAM as the training on a CPU.
    staging = {STAGING: checkpoint_bytes(cfg, args) / sizes.shard / GIB} if cfg.checkpoint.async_save else {}
    if on_cpu:
        breakdown.update(staging)
        breakdown["process baseline (before the model)"] = baseline_gib
    peak = sum(breakdown.values())
    usable = capacity_gib - reserved_gib
    return MemoryPlan(peak_gib=peak, capacity_gib=usable, fits=peak <= usable, moment=moment, breakdown=breakdown,
                      path=asdict(path), baseline_gib=baseline_gib if on_cpu else 0.0, host={} if on_cpu else staging)  # fmt: skip


@dataclass(frozen=True)
class _Sizes:
    """The byte counts every moment of the plan is made of."""

    shard: int  # ranks a parameter is sharded over
    cb: int  # compute (gathered parameter) bytes per element
    T: int  # tokens per micro-batch
    H: int
    I: int
    V: int
    n_block: int  # parameters of one decoder block
    n_head_group: int  # the [norm, lm_head] group; tied, the root group: the embedding (the head) and the norm
    last_gather: int  # the forward's last all-gather output, bytes
    static: dict  # sharded master weights, gradients and moments: there all step long
    per_layer: int  # what a layer saves for backward, without checkpointing
    checkpointed: tuple[bool, ...]  # per layer
    kept: tuple[int, ...]  # what each layer keeps for backward: its input when checkpointed, else all it saves
    head_saves: int  # the final norm's input and fp32 rstd
    cp_kv: int = 0  # context parallelism: a layer's chunk key prefixes picked from the gathered K/V, bytes

    @classmethod
    def of(cls, cfg: Config, args: ModelArgs, shard: int, path: ExecutionPath) -> _Sizes:
        p = cfg.parallel
        cb = dtype_of(cfg.train.dtype).itemsize
        # Under context parallelism a rank holds 1/cp of each micro-batch's tokens (each document
        # padded to a multiple of 2 cp: at most 2 cp - 1 tokens per document, left out here).
        T, H, V, L = -(-cfg.data.tokens_per_microbatch // p.cp), args.hidden_size, args.vocab_size, args.num_layers
        kv_token = 2 * args.num_kv_heads * args.head_dim * cb
        # At a layer's MLP backward (its peak) the attention's saved inputs are alive: the chunks' key
        # prefixes indexed from the gathered K/V, (cp + 1/2) T rows (limo/data/context.py); the
        # all-gather's output is freed once indexed, and the K/V gradients come after the MLP's.
        cp_kv = int((p.cp + 0.5) * T * kv_token) if p.cp > 1 else 0
        n_total = args.num_params()
        n_head = 0 if args.tie_word_embeddings else V * H
        n_block = (n_total - V * H - n_head - H) // L
        n_head_group = V * H + H
        per_layer = layer_activation_bytes_per_token(args, cb, path) * T
        checkpointed = tuple(p.activation_checkpointing == "full" or (p.activation_checkpointing == "selective" and i % 2 == 0)
                             for i in range(L))  # fmt: skip
        # Untied, the head's own group is gathered last; tied, the head is the root group's
        # embedding, gathered first, and the last is the last block's.
        last_gather = (n_block if args.tie_word_embeddings else n_head_group) * cb
        return cls(shard=shard, cb=cb, T=T, H=H, I=args.intermediate_size, V=V, n_block=n_block, n_head_group=n_head_group, last_gather=last_gather,
                   static=_static_state(cfg, n_total, shard), per_layer=per_layer, checkpointed=checkpointed,
                   kept=tuple(T * H * cb if ck else per_layer for ck in checkpointed), head_saves=T * H * cb + T * 4, cp_kv=cp_kv)  # fmt: skip


def _loss_head_moments(s: _Sizes, path: ExecutionPath) -> dict[str, dict[str, float]]:
    """The loss head's forward and backward: every layer's kept activations, the head's group
    gathered, and the forward's last all-gather output (FSDP2 frees one only at the next group's
    copy-out), with the fused cross-entropy's chunk and fp32 gradients."""
    on_cpu = path.device != "cuda"
    gathered_head = {"gathered head": s.n_head_group * s.cb, "last all-gather output": s.last_gather if s.shard > 1 else 0}
    chunk = chunk_tokens(s.T, s.V, dtype_of("bfloat16" if s.cb == 2 else "float32"), device_type=path.device)  # the kernel's own rule
    # A half chunk's fp32 working copy, one at a time: the torch twin computes its loss in fp32,
    # and a CPU's matmuls take half operands to fp32 (no fp32-output half matmuls there), the head too.
    chunk_copies = chunk * s.V * 4 if s.cb < 4 and (path.kernels == "torch" or on_cpu) else 0
    head_upcast = s.V * s.H * 4 if on_cpu and s.cb < 4 else 0
    ce_fp32 = s.V * s.H * 4 + s.T * s.H * 4  # the fused cross-entropy's fp32 dweight and dhidden
    saved = sum(s.kept) + s.head_saves
    return {
        "head forward": {
            **s.static, **gathered_head, "saved activations": saved,
            "loss head (logits chunk + fp32 grads)": chunk * s.V * s.cb + chunk_copies + head_upcast + ce_fp32,
        },
        "head backward": {
            **s.static, **gathered_head, "saved activations": saved,
            "loss head (fp32 grads + their casts)": ce_fp32 + s.V * s.H * s.cb + s.T * s.H * s.cb,
        },
    }  # fmt: skip


def _layer_backward_moments(s: _Sizes, cfg: Config) -> dict[str, dict[str, float]]:
    """A layer's backward, for the last two layers (the first two in backward order): what the
    layers before it keep, its own saved activations (recomputed from its kept input, when
    checkpointed), the MLP's gradients in flight and its gathered weights. Weight gradients are
    in flight too: in the first layer, its MLP's, unsharded (its attention's come after the MLP's
    temporaries are freed: counting the whole block's had over-planned the small shapes of
    tests/test_simulate.py by up to 5.3%); from the second on, the previous layer's whole block:
    in its fp32 reduce-scatter input with more than one shard, unsharded with one."""
    L = len(s.kept)
    mlp_grads = 3 * s.T * s.I * s.cb + 2 * s.T * s.H * s.cb  # d(product), d(gate), d(up); dh in and out
    gathered_blocks = s.n_block * s.cb if cfg.parallel.reshard_after_forward else L * s.n_block * s.cb  # ZeRO-2 keeps every block gathered
    moments = {}
    for j in (L - 1, L - 2) if L > 1 else (L - 1,):
        moments[f"layer {j} backward"] = {
            **s.static,
            "gathered block": gathered_blocks,
            "saved activations": sum(s.kept[:j]) + (0 if s.checkpointed[j] else s.kept[j]),
            "recomputed layer + its gradients": (s.per_layer if s.checkpointed[j] else 0) + mlp_grads,
            "gathered K/V prefixes (context parallel)": s.cp_kv,
            "block gradients in flight": (3 * s.H * s.I * s.cb if j == L - 1  # the first layer back: its MLP's so far
                                          else s.n_block * 4 if s.shard > 1 else s.n_block * s.cb),
        }
    return moments


# The lines of a plan that no tracker of live tensors sees (limo/engine/simulate.py leaves them out).
UNTRACKED = ("allocator", "prefetched blocks' all-gather outputs (CUDA streams)", "process baseline (before the model)")


def _static_state(cfg: Config, n_total: int, shard: int) -> dict[str, float]:
    """Sharded fp32 master weights and gradients, and both AdamW moments: there all step long."""
    on_device = 0 if cfg.parallel.cpu_offload else 1
    state_bytes = dtype_of(cfg.optim.state_dtype).itemsize
    return {
        "params (sharded fp32)": on_device * n_total * 4 / shard,
        "grads (sharded fp32)": on_device * n_total * 4 / shard,
        "optimizer (sharded moments)": on_device * 2 * n_total * state_bytes / shard,
    }


def checkpoint_bytes(cfg: Config, args: ModelArgs) -> int:
    """Bytes of one DCP checkpoint on disk, all ranks together: the fp32 master weights and both
    AdamW moments, the state the plan counts as static (Qwen2.5-32B with bf16 moments: 262 GB)."""
    state_bytes = dtype_of(cfg.optim.state_dtype).itemsize
    return args.num_params() * (4 + 2 * state_bytes)


# ---------------------------------------------------------------------------------------------
# What a process really holds: the measurement the plan is held to.


def host_rss_gib(peak: bool = False) -> float | None:
    """This process's resident set (or, with `peak`, its high-water mark VmHWM) in GiB, from
    /proc/self/status; None where there is no such file (not Linux)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    key = "VmHWM:" if peak else "VmRSS:"
    for line in status.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 2**20  # KiB
    return None


class PeakProbe:
    """This process's peak memory from now on, for the plan to be checked against.

    CUDA: the caching allocator's peak of allocated bytes. CPU: the resident set's high-water
    mark (VmHWM), reset here through /proc/self/clear_refs, so the peak is the training's and not
    an earlier one's; the resident set at the reset is the process's baseline, and the mark before
    it (loading the data and the tokenizer) is kept as `startup_peak_gib`.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.startup_peak_gib: float | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline_gib = torch.cuda.memory_allocated(device) / GIB
            return
        self.startup_peak_gib = host_rss_gib(peak=True)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        except OSError:  # not Linux: the peak then counts from the process's start
            pass
        self.baseline_gib = host_rss_gib() or 0.0

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        hwm = host_rss_gib(peak=True)
        if hwm is None:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, the process's whole life
        return hwm


def record_peaks(path: str | os.PathLike, plan: MemoryPlan, probe: PeakProbe, rank: int, world_size: int) -> None:
    """Every rank's measured peak beside the plan, in one JSON file (rank 0 writes it): the
    planner's error on this run, per rank. On a CPU both sides count from the process's baseline
    (`growth`); on a GPU, from an empty allocator. Every rank must call it (an all-gather)."""
    import torch.distributed as dist

    mine = {"rank": rank, "startup_peak_gib": probe.startup_peak_gib, "baseline_gib": probe.baseline_gib, "peak_gib": probe.peak_gib()}
    ranks = [mine]
    if dist.is_initialized() and world_size > 1:
        ranks = [None] * world_size
        dist.all_gather_object(ranks, mine)
    if rank != 0:
        return
    cpu = probe.device.type != "cuda"
    for r in ranks:
        r["growth_gib"] = r["peak_gib"] - r["baseline_gib"] if cpu else r["peak_gib"]
        r["plan_error"] = r["growth_gib"] / plan.growth_gib - 1.0  # > 0: more than planned
    report = {"plan": {**asdict(plan), "growth_gib": plan.growth_gib}, "measured": ranks,
              "what": "growth = peak RSS - RSS before the model was built (CPU); peak allocated (CUDA)"}
    Path(path).write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    import argparse

    from limo.model.weights import model_args

    p = argparse.ArgumentParser(prog="python -m limo.engine.memory", description="Per-rank peak memory of a training plan.")
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, default=8, help="ranks in the run (default 8)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="plan for GPUs (Triton, flash) or CPU processes (torch kernels, "
                                                               "SDPA); default: train.device, or cuda when it is auto")
    p.add_argument("--capacity-gib", type=float,
                   help=f"memory of one rank (default {H100_80GB_GIB:.1f} GiB, an 80 GB H100; on --device cpu, this host's RAM "
                        "over --world-size)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        device = args.device or ("cpu" if cfg.train.device == "cpu" else "cuda")
        model, source = model_args(cfg)
        capacity = args.capacity_gib
        if capacity is None:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
            capacity = H100_80GB_GIB if device == "cuda" else host / args.world_size
        plan = plan_memory(cfg, model, args.world_size, capacity, path=ExecutionPath.default_for(device))
        plan.config_source = source
    except ValueError as e:  # ConfigError, WeightsError, ArchitectureError: all name what is wrong
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(plan), "growth_gib": plan.growth_gib}))
    else:
        unit = "GPUs" if device == "cuda" else "CPU processes"
        print(f"{args.config} on {args.world_size} {unit} of {capacity:.1f} GiB (model config: {source}):\n{plan.report()}")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
