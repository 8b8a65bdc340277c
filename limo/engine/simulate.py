"""One training step of the configured model at full size, run on a CPU without its memory: each
rank's peak by category, where in the step it falls, and the bytes of every collective.

    python -m limo.engine.simulate --config FILE [--world-size N] [--step K | --full-batches K] [--json] [--section.key=value ...]

What runs is what limo/engine/train.py runs, on fake tensors: the model built on the meta device;
limo/engine/sharding.py's plan (checkpointing, FSDP2 groups, mixed precision, prefetch, HSDP from
parallel.dp_replicate) over a fake process group of N ranks; the optimizer with the recipe's
state dtype; then one whole step, `engine.train.train_step` over this rank's micro-batches of one
global batch as limo/data/loader.py packs them (sample lengths drawn from the long-CoT proxy,
limo/data/lengths.py, or read from --data.path), then the optimizer step. The ops are the GPU's: the
Triton kernels' torch.library ops and flash / torch varlen attention, through their fake
implementations (kernels.dispatch.as_device("cuda")); nothing runs, and nothing is allocated.

Fake CPU tensors stand for the GPU's: a CPU-only torch cannot differentiate through fake CUDA
tensors (no CUDA device guard), and FSDP2 refuses meta parameters. Model configs resolve offline
(model.weights.model_args), so this works with no network.

Memory is counted by torch's FSDPMemTracker, which sorts every live tensor into sharded and
unsharded parameters and gradients, all-gather and reduce-scatter buffers, activations,
temporaries, optimizer state and inputs, and keeps the peak. Where it would miscount:
  - An op's internal buffers are invisible to a dispatch mode: it sees the op's outputs only. The
    fused cross-entropy's working buffer (the chunk's logits: 1 GiB at Qwen's vocabulary) is
    therefore tracked by hand for the op's duration (kernels.cross_entropy.workspace_bytes); the
    other ops allocate only their outputs.
  - The optimizer's state is created by its first step, after the peak of a first step. It is
    created here by a step on zero gradients before the measured step, so the step measured is a
    steady-state one, as every step but the first is in training.
  - FSDP2 frees an unsharded parameter by resizing its storage to zero, which the tracker follows.
  - DTensor's sharding propagation runs each op on global-shape fake arguments to learn the
    output's metadata, in the fake mode it finds active: here, ours. The tracker would count those
    arguments (the whole model's gradients, during the norm of the clip); its peak is not updated
    while propagation runs.
What no tracker on fake tensors can see (the CUDA context, NCCL's buffers, the caching
allocator's fragmentation) is named in the planner's report as separate lines (limo/engine/memory.py).

Collectives are counted by the bytes of the buffers each one moves: an all-gather's output, a
reduce-scatter's input, an all-reduce's tensor, per step and per rank. On a ring each rank sends
(and receives) (n - 1) / n of that over its links; benchmarks/project.py turns it into time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _MemRefType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from limo.data import lengths
from limo.data.context import shard_for_cp
from limo.data.dataset import EncodedSample, load_samples, resolve_tokenizer
from limo.data.loader import PackedLoader
from limo.data.packing import CostModel, pack
from limo.engine.config import Config, ConfigError, load_config
from limo.engine.distributed import build_mesh
from limo.engine.memory import GIB, H100_80GB_GIB, UNTRACKED, ExecutionPath, MemoryPlan, plan_memory
from limo.engine.optim import build_optimizer
from limo.engine.sharding import parallelize
from limo.engine.train import train_step
from limo.kernels import dispatch
from limo.kernels.cross_entropy import workspace_bytes
from limo.model.qwen2 import ModelArgs, build_model
from limo.model.weights import model_args
from limo.tools.dtypes import dtype_of

# c10d's ops, by what they do; the argument whose bytes count for each.
_COLLECTIVES = {
    "_allgather_base_": ("all_gather", 0),  # (output, input): the gathered output
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),  # (output, input): the input being reduced
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "allreduce_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
}
MICRO_BATCH_TENSORS = ("input_ids", "labels", "position_ids", "cu_seqlens")
SHARD_TENSORS = ("input_ids", "labels", "position_ids", "gather_index", "cu_q", "cu_k")
_CATEGORIES = {  # FSDPMemTracker's names -> ours
    "SHARDED_PARAM": "sharded parameters", "UNSHARDED_PARAM": "unsharded parameters", "BUFFER": "buffers",
    "SHARDED_GRAD": "sharded gradients", "UNSHARDED_GRAD": "unsharded gradients", "OPT": "optimizer state",
    "ALL_GATHER": "all-gather buffers", "REDUCE_SCATTER": "reduce-scatter buffers", "ACT": "activations",
    "TEMP": "temporaries", "INP": "inputs",
}  # fmt: skip


@dataclass
class Simulation:
    peak_gib: float
    planned_gib: float  # the planner's tensor peak for the same run (engine.memory, without what the tracker cannot see)
    breakdown: dict[str, float]  # GiB per category at the peak; sums to peak_gib
    peak_module: str  # the module (and phase) during which the peak falls
    collectives: dict[str, int]  # bytes per step per rank, by kind
    world_size: int
    num_layers: int
    seconds: float
    micro_batches: list[int] = field(default_factory=list)  # tokens of each of this rank's micro-batches
    plan: dict = field(default_factory=dict)  # the planner's whole report

    @property
    def planner_error(self) -> float:
        return self.planned_gib / self.peak_gib - 1.0


class CollectiveBytes(TorchDispatchMode):
    """Counts the bytes of every c10d collective dispatched while active, by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.namespace, func._opname  # e.g. c10d, _allgather_base_
        if namespace == "c10d" and name in _COLLECTIVES:
            kind, index = _COLLECTIVES[name]
            tensors = args[index]
            for t in tensors if isinstance(tensors, (list, tuple)) else (tensors,):
                for u in t if isinstance(t, (list, tuple)) else (t,):
                    self.bytes[kind] += u.numel() * u.element_size()
        return func(*args, **(kwargs or {}))


def _lengths(cfg: Config, samples: int, seed: int, read_data: bool) -> list[int]:
    """Sample lengths: the data's, tokenized as training does (`read_data`: --data.path was given),
    or drawn from the long-CoT proxy (a recipe's data.path may be a hub id out of reach)."""
    if read_data:
        tokenizer = resolve_tokenizer(cfg.data, model_path=cfg.model.path)
        encoded, _ = load_samples(cfg.data, tokenizer)
        return [len(s) for s in encoded]
    drawn = lengths.draw(samples, seed, cap=cfg.data.max_tokens)
    return drawn if cfg.data.overlong == "truncate" else [n for n in lengths.draw(samples, seed, cap=10**9) if n <= cfg.data.max_tokens]


def _step_batch(cfg: Config, args: ModelArgs, world_size: int, step: int | None, samples: int, read_data: bool):
    """This rank's (rank 0's) share of one global step, as limo/data/loader.py packs it: step `step`, or
    (None) the step of the first epoch whose largest micro-batch on rank 0 is the largest."""
    encoded = [EncodedSample(torch.zeros(n, dtype=torch.int32), torch.ones(n, dtype=torch.int32), index=i)
               for i, n in enumerate(_lengths(cfg, samples, cfg.train.seed, read_data))]  # fmt: skip
    loader = PackedLoader(encoded, samples_per_step=cfg.data.samples_per_step, tokens_per_microbatch=cfg.data.tokens_per_microbatch,
                          epochs=1, world_size=world_size, rank=0, seed=cfg.train.seed, cost=CostModel.for_model(args))  # fmt: skip
    if step is not None:
        return loader.batch(step % loader.total_steps)
    batches = [loader.batch(k) for k in range(loader.steps_per_epoch)]
    return max(batches, key=lambda b: (max(len(mb) for mb in b.micro_batches), len(b.micro_batches)))


def _full_batch(cfg: Config, count: int):
    """`count` micro-batches of exactly data.tokens_per_microbatch tokens each, in samples of at most
    data.max_tokens: the worst case the planner plans for (from the second one on, the gradients of
    the step so far are all there during backward)."""
    T, longest = cfg.data.tokens_per_microbatch, cfg.data.max_tokens
    lengths = [longest] * (T // longest) + ([T % longest] if T % longest else [])
    micro_batches = [pack([EncodedSample(torch.zeros(n, dtype=torch.int32), torch.ones(n, dtype=torch.int32), index=i)
                           for i, n in enumerate(lengths)]) for _ in range(count)]  # fmt: skip
    return SimpleNamespace(micro_batches=micro_batches, num_label_tokens=sum(mb.num_label_tokens for mb in micro_batches))


def _in_sharding_propagation() -> bool:
    """Whether DTensor's sharding propagation is running (it reuses the active fake mode)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_propagate_tensor_meta_non_cached":
            return True
        frame = frame.f_back
    return False


def _step_tracker(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """An FSDPMemTracker over one step of several micro-batches, that also says where its peak fell.

    The tracker keeps one forward's per-module stats and refuses a second forward: here each new
    forward clears them first (the step's peak is kept apart from them). Only the step's peak is
    kept up to date: torch's tracker also walks every module's stats after every op, to keep each
    module's own peak, which nothing here reads (the 32B step took 123 s with that walk, 40 s without).
    Whenever the peak rises, the innermost module running then, and the pass, are noted in `peak_place`.
    """
    class StepTracker(FSDPMemTracker):
        peak_place = "the optimizer step"

        def _update_peak_stats(self, peak_state) -> None:
            if _in_sharding_propagation():
                return  # DTensor's metadata propagation: global-shape fake arguments no rank ever holds
            risen = False
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = snap[_TOTAL_KEY], deepcopy(snap)
                    risen = True
            if risen:
                running = [m for m in self._mod_tracker.parents if m != "Global"]
                if not running:
                    self.peak_place = "between modules (the loss's backward, the clip or the optimizer)"
                else:
                    innermost = max(running, key=lambda name: name.count("."))
                    self.peak_place = f"{innermost} ({'backward' if self._mod_tracker.is_bw else 'forward'})"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.limo.linear_cross_entropy.default or any(t is DTensor for t in types):
                return super().__torch_dispatch__(func, types, args, kwargs)
            hidden, weight, _, _, _, _, chunk_size, backend = args[:8]
            workspace = hidden.new_empty(workspace_bytes(hidden, weight, chunk_size, backend), dtype=torch.uint8)
            self._track(_MemRefType.TEMP, workspace)  # alive beside the op's outputs, as in the real op
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                del workspace

        def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig_fsdp_state_pre_fw)

            def pre_forward(*args, **kwargs):
                fqn = self._mod_tracker.get_known_fqn(fsdp_mod)
                if fsdp_mod in self.memory_tracking and not self._mod_tracker.is_bw and self._mod_tracker.parents - {fqn} == {"Global"}:
                    self.reset_mod_stats()  # a new micro-batch's forward
                return inner(*args, **kwargs)

            return pre_forward

    return StepTracker(model, optimizer)


def _fake_step(cfg: Config, args: ModelArgs, world_size: int, batch: Any, dtype: torch.dtype) -> tuple[dict, str, dict[str, int]]:
    """train.py's model, plan and optimizer on fake tensors in the (fake) process group, and one
    steady step over `batch`: the tracker's peak snapshot, where it fell, the collectives' bytes."""
    mesh = build_mesh("cpu", world_size, cfg.parallel.dp_replicate)
    cp = cfg.parallel.cp
    # Context parallelism: rank 0's cp group, and its shares of the micro-batches, cut on the host
    # (limo/data/context.py reads their bounds) before they become fake.
    world, shards = None, []
    if cp > 1:
        group = init_device_mesh("cpu", (world_size // cp, cp), mesh_dim_names=("dp", "cp"))["cp"].get_group()
        world = SimpleNamespace(cp=cp, cp_rank=0, cp_group=group)
        shards = [shard_for_cp(mb, cp, 0) for mb in batch.micro_batches]
    model = build_model(args, device="meta", dtype=torch.float32)  # fp32 master weights, as train.py
    parallelize(model, mesh, cfg.parallel, param_dtype=dtype)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, dispatch.as_device("cuda"):
        if cp > 1:
            micro_batches = [replace(sh, **{k: mode.from_tensor(getattr(sh, k)) for k in SHARD_TENSORS}) for sh in shards]
        else:
            micro_batches = [replace(mb, **{k: mode.from_tensor(getattr(mb, k)) for k in MICRO_BATCH_TENSORS}) for mb in batch.micro_batches]
        model.to_empty(device="cpu")
        model.tie_weights()
        optimizer = build_optimizer(model, cfg.optim, torch.device("cuda"))  # the GPU's choice of implementation
        for p in model.parameters():  # the state of a steady step: created by a step on zero gradients
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker = _step_tracker(model, optimizer)
        counter = CollectiveBytes()
        with tracker, counter:
            train_step(model, micro_batches, max(batch.num_label_tokens, 1), torch.device("cpu"), cfg.train.max_grad_norm, world)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return tracker.get_tracker_snapshot("peak"), tracker.peak_place, dict(counter.bytes)


def simulate(cfg: Config, world_size: int, step: int | None = None, samples: int = 817, capacity_gib: float = H100_80GB_GIB,
             read_data: bool = False, full_batches: int = 0) -> Simulation:
    """One simulated training step of `cfg` on `world_size` ranks (see the module docstring).

    The step's batch: `full_batches` micro-batches of data.tokens_per_microbatch tokens each (the
    planner's worst case), or else global step `step` as the loader packs it (None: the heaviest
    of the first epoch), its sample lengths from cfg.data.path (`read_data`) or the long-CoT proxy.
    """
    if cfg.parallel.cpu_offload:
        raise ConfigError("parallel.cpu_offload=true is not simulated: its state lives in host memory, not the GPU's")
    start = time.perf_counter()
    args, _ = model_args(cfg)
    if world_size % cfg.parallel.cp:
        raise ConfigError(f"parallel.cp={cfg.parallel.cp} does not divide --world-size {world_size}")
    dp = world_size // cfg.parallel.cp  # the loader deals data over the data-parallel groups
    batch = _full_batch(cfg, full_batches) if full_batches else _step_batch(cfg, args, dp, step, samples, read_data)
    dtype = dtype_of(cfg.train.dtype)
    if dist.is_initialized():
        raise RuntimeError("limo.engine.simulate starts its own (fake) process group: call it outside one")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        peak, peak_place, collectives = _fake_step(cfg, args, world_size, batch, dtype)
    finally:
        dist.destroy_process_group()
    per_device = next(iter(peak.values()))
    breakdown = {_CATEGORIES[str(k).split(".")[-1]]: v / GIB for k, v in per_device.items()
                 if str(k).split(".")[-1] in _CATEGORIES and v}  # fmt: skip
    peak_bytes = per_device["Total"]
    attention = dispatch.attention_backend("cuda", dtype)
    plan = plan_memory(cfg, args, world_size, capacity_gib, path=ExecutionPath("cuda", "triton", attention))
    return Simulation(
        peak_gib=peak_bytes / GIB, planned_gib=tensor_gib(plan), breakdown=breakdown, peak_module=peak_place,
        collectives=collectives, world_size=world_size, num_layers=args.num_layers, seconds=time.perf_counter() - start,
        micro_batches=[len(mb) for mb in batch.micro_batches], plan=asdict(plan),
    )  # fmt: skip


def tensor_gib(plan: MemoryPlan) -> float:
    """The planner's peak of tensors alone: what a tracker of live tensors can be held to."""
    return plan.peak_gib - sum(plan.breakdown.get(k, 0.0) for k in UNTRACKED)


def report(sim: Simulation, full_batches: int = 0) -> str:
    plan = sim.plan["breakdown"]
    rows = max(len(sim.breakdown), len(plan))
    left = list(sim.breakdown.items()) + [("", None)] * (rows - len(sim.breakdown))
    right = list(plan.items()) + [("", None)] * (rows - len(plan))
    lines = [f"{'simulated (FSDPMemTracker)':<32} {'GiB':>7}   {'planned (engine.memory)':<40} {'GiB':>7}"]
    for (a, x), (b, y) in zip(left, right):
        lines.append(f"{a:<32} {'' if x is None else f'{x:7.2f}':>7}   {b:<40} {'' if y is None else f'{y:7.2f}':>7}")
    lines.append(f"{'peak':<32} {sim.peak_gib:7.2f}   {'peak (tensors, without allocator)':<40} {sim.planned_gib:7.2f}")
    lines.append(f"the peak falls in {sim.peak_module}; planner error {100 * sim.planner_error:+.1f}%; "
                 f"planned total with fragmentation {sim.plan['peak_gib']:.2f} of {sim.plan['capacity_gib']:.1f} GiB usable")  # fmt: skip
    if not full_batches:
        lines.append("(the planner plans full micro-batches, the worst case; this step's micro-batches hold fewer tokens, so the plan "
                     "sits above it: --full-batches 2 holds the planner to the step it plans)")
    comm = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sorted(sim.collectives.items()))
    lines.append(f"collectives per step per rank: {comm}")
    lines.append(f"{sim.world_size} ranks, {sim.num_layers} layers, micro-batches {sim.micro_batches} tokens; {sim.seconds:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m limo.engine.simulate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, default=8, help="ranks (default 8); with parallel.dp_replicate=R, R nodes of N/R")
    p.add_argument("--step", type=int, help="which global step's batch to run (default: the first epoch's heaviest on rank 0)")
    p.add_argument("--full-batches", type=int, default=0, metavar="K",
                   help="run K micro-batches of exactly data.tokens_per_microbatch tokens instead: the planner's worst case")
    p.add_argument("--samples", type=int, default=817,
                   help="samples drawn from the long-CoT proxy (default 817, LIMO's); --data.path=FILE reads real ones instead")
    p.add_argument("--capacity-gib", type=float, default=H100_80GB_GIB, help="memory of one GPU for the plan (default: an 80 GB H100)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        if args.world_size < 1:
            raise ConfigError(f"--world-size={args.world_size} must be >= 1")
        read_data = any(o.split("=", 1)[0] == "--data.path" for o in overrides)
        sim = simulate(cfg, args.world_size, args.step, args.samples, args.capacity_gib, read_data, args.full_batches)
    except ValueError as e:  # ConfigError, WeightsError, ArchitectureError, DataError: all name what is wrong
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        keys = ("peak_gib", "planned_gib", "breakdown", "peak_module", "collectives", "world_size", "num_layers", "seconds")
        print(json.dumps({**{k: getattr(sim, k) for k in keys}, "planner_error": sim.planner_error, "micro_batches": sim.micro_batches}))
    else:
        print(report(sim, args.full_batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
