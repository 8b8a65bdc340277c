"""The training step on Qwen2.5-32B's layer shapes with k layers: tokens/s, MFU, memory vs the planner.

    python -m benchmarks.bench_train_step                                   # the full sweep on one GPU
    python -m benchmarks.bench_train_step --configs triton-full-eager-L2,triton-full-eager-L4 --out train.json
    TRITON_INTERPRET=1 python -m benchmarks.bench_train_step --sweep smoke  # a tiny model on CPU

What is timed is limo/engine/train.py's step (forward with labels -> loss sum / divisor -> backward per
micro-batch, clip, one host sync, AdamW) on the model and optimizer training builds
(engine.train.build_training) from the LIMO recipe's config (configs/limo_qwen2.5_32b_8xh100.toml):
the FSDP2 plan of limo/engine/sharding.py on a world of one (bf16 compute, fp32 master weights and
reduce), limo/engine/optim.py's optimizer. The model is the 32B preset with `num_layers=k`, its weights
drawn on the device by limo/model/init.py's rule. The micro-batches are
synthetic token ids packed by limo/data/packing.py into 16,384-token streams, with sample lengths drawn
from the long-CoT proxy (limo/data/lengths.py); every config runs the same micro-batches.

Reported per config: step time and its phases (forward+backward+clip+sync, then AdamW),
tokens/s, MFU as ANCHORS.md counts it (causal attention) and torchtitan's, the peak memory
(allocated and reserved) against engine.memory.plan_memory's prediction. A config that runs out
of memory is recorded as "oom" next to the planner's verdict; the sweep goes on.
Configs that differ only in k give the per-layer fit `step(k) = rest + k * per_layer`, which
benchmarks/project.py scales to 64 layers for the LIMO projection.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.harness import LIMO_RECIPE, SCHEMA, Record, Unavailable, environment, finish, kernel_choice, measure_ceilings
from limo.data import lengths as length_dist
from limo.data.dataset import EncodedSample
from limo.data.packing import MicroBatch, pack, plan
from limo.engine.config import Config, load_config
from limo.engine.distributed import Distributed, init_distributed
from limo.engine.memory import GIB, H100_80GB_GIB, plan_memory
from limo.engine.metrics import peak_flops
from limo.engine.train import build_training
from limo.engine.train import train_step as engine_train_step
from limo.model.flops import head_flops, layer_flops, step_flops, step_flops_torchtitan
from limo.model.qwen2 import PRESETS, ModelArgs
from limo.tools.errors import refuse


@dataclass(frozen=True)
class StepConfig:
    layers: int
    kernels: str = "triton"  # triton | torch (kernels.set_backend) | liger (Liger's RMSNorm and fused linear CE swapped in)
    ac: str = "full"  # parallel.activation_checkpointing: none | full | selective
    compile: bool = False  # parallel.compile: torch.compile each decoder block
    state_dtype: str = "bfloat16"  # optim.state_dtype (the recipe's: bf16 AdamW moments)

    @property
    def name(self) -> str:
        state = "" if self.state_dtype == "bfloat16" else f"-{self.state_dtype}-state"
        return f"{self.kernels}-{self.ac}-{'compile' if self.compile else 'eager'}{state}-L{self.layers}"


@dataclass(frozen=True)
class Sweep:
    args: ModelArgs  # layer shapes; num_layers is replaced by each config's
    tokens: int  # micro-batch budget (and per-sample cutoff)
    micro_batches: int  # per step
    dtype: str  # compute dtype (FSDP param_dtype)
    warmup: int  # untimed steps (compilation, optimizer state)
    steps: int  # timed steps
    configs: tuple[StepConfig, ...]


_SMOKE_ARGS = ModelArgs(vocab_size=203, hidden_size=48, intermediate_size=100, num_layers=1, num_heads=6, num_kv_heads=2,
                        rope_theta=10_000.0)  # fmt: skip
SWEEPS = {
    "full": Sweep(PRESETS["qwen2.5-32b"], 16384, 2, "bfloat16", 2, 3, (
        StepConfig(2), StepConfig(4),  # the recipe, at two depths: the per-layer fit the projection uses
        StepConfig(2, compile=True), StepConfig(4, compile=True),
        # The torch backend: the RMSNorm reference and the cross-entropy's torch twin (the same
        # chunks in torch ops), against the recipe at the same depth.
        StepConfig(2, kernels="torch"), StepConfig(4, kernels="liger"),
        StepConfig(4, ac="selective"), StepConfig(4, ac="none"),
        StepConfig(4, state_dtype="float32"),
        StepConfig(8, ac="none"),  # the planner says it does not fit: an OOM to record (last, so it disturbs nothing after it)
    )),
    "quick": Sweep(PRESETS["qwen2.5-32b"], 16384, 2, "bfloat16", 1, 2, (StepConfig(2), StepConfig(4))),  # gpu_suite.sh quick
    "smoke": Sweep(_SMOKE_ARGS, 256, 2, "float32", 1, 1, (  # Triton runs in its interpreter here: slow, so few Triton configs
        StepConfig(1), StepConfig(2), StepConfig(2, kernels="torch"), StepConfig(2, kernels="liger"),
        StepConfig(2, kernels="torch", ac="selective"), StepConfig(2, kernels="torch", ac="none"),
    )),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Inputs


def micro_batches(vocab_size: int, budget: int, count: int, seed: int = 0) -> list[MicroBatch]:
    """`count` of limo/data/packing.py's micro-batches, picked at random, over samples drawn from the
    long-CoT proxy (lengths scaled by budget / 16384, so a smoke budget keeps the distribution's
    shape). Picking the fullest instead would favour lone capped samples (their attention costs
    most). Token ids are random; each sample's first eighth (at most 256 tokens) is an
    unsupervised prompt."""
    pool = length_dist.load()
    scale = budget / length_dist.LIMO_CUTOFF
    mean = statistics.fmean(min(n * scale, budget) for n in pool)
    lengths = length_dist.draw(math.ceil(4 * count * budget / mean), seed, cap=budget, scale=scale, lengths=pool)
    bins = plan(lengths, 1, budget)[0]
    random.Random(seed).shuffle(bins)
    bins = bins[:count]
    g = torch.Generator().manual_seed(seed)
    out = []
    for group in bins:
        samples = []
        for i in group:
            ids = torch.randint(0, vocab_size, (lengths[i],), generator=g, dtype=torch.int32)  # [L]
            labels = ids.clone()
            labels[: max(1, min(lengths[i] // 8, 256))] = -100
            samples.append(EncodedSample(ids, labels, index=i))
        out.append(pack(samples))
    return out


def recipe_config(sweep: Sweep, config: StepConfig) -> Config:
    """The LIMO recipe with this config's ablation applied (what the planner is asked about)."""
    return load_config(LIMO_RECIPE, [
        "--model.path=none", "--model.preset=qwen2.5-32b", f"--train.dtype={sweep.dtype}",
        f"--data.max_tokens={sweep.tokens}", f"--data.tokens_per_microbatch={sweep.tokens}",
        f"--parallel.activation_checkpointing={config.ac}", f"--parallel.compile={config.compile}",
        f"--optim.state_dtype={config.state_dtype}",
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The step


class Marks:
    """Timestamps between a step's phases: CUDA events (read after one sync) or the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()  # host sync: after the step, to read its events
            return [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.points, self.points[1:])]


def train_step(model, optimizer, batches: list[MicroBatch], divisor: int, max_grad_norm: float, device: torch.device, marks: Marks):
    """limo/engine/train.py's step (engine.train.train_step, then AdamW), marked between its phases.

    A non-finite loss or norm is an error here (train.py skips such a step): the benchmark's
    step must compute what training computes.
    """
    marks.mark()
    loss_value, norm_value = engine_train_step(model, batches, divisor, device, max_grad_norm).tolist()  # the step's host sync
    marks.mark()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise RuntimeError(f"non-finite loss {loss_value} or grad norm {norm_value}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    marks.mark()
    return loss_value, norm_value


def _run(sweep: Sweep, config: StepConfig, world: Distributed, batches: list[MicroBatch]) -> dict:
    cfg = recipe_config(sweep, config)
    args = replace(sweep.args, num_layers=config.layers)
    torch.manual_seed(0)
    model, optimizer = build_training(cfg, args, world)  # as train.py builds it: fp32 master weights, the FSDP2 plan, filled on the device
    model.train()
    divisor = sum(mb.num_label_tokens for mb in batches)
    first = train_step(model, optimizer, batches, divisor, cfg.train.max_grad_norm, world.device, Marks(world.device))
    for _ in range(sweep.warmup - 1):
        train_step(model, optimizer, batches, divisor, cfg.train.max_grad_norm, world.device, Marks(world.device))
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    phases = []
    for _ in range(sweep.steps):
        marks = Marks(world.device)
        last = train_step(model, optimizer, batches, divisor, cfg.train.max_grad_norm, world.device, marks)
        phases.append(marks.intervals_ms())
    out = {
        "fwd_bwd_ms": statistics.median(p[0] for p in phases),
        "optim_ms": statistics.median(p[1] for p in phases),
        "step_ms": statistics.median(sum(p) for p in phases),
        "first_loss": first[0], "last_loss": last[0], "last_grad_norm": last[1],
    }  # fmt: skip
    if world.device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(world.device) / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(world.device) / GIB
    return out


def run_config(sweep: Sweep, config: StepConfig, world: Distributed, batches: list[MicroBatch], ceilings: dict, log=print) -> Record:
    """One config measured, or recorded as unavailable / oom / error: never raises."""
    args = replace(sweep.args, num_layers=config.layers)
    seqlens = [int(n) for mb in batches for n in mb.cu_seqlens.diff().tolist()]  # host data: no device sync
    tokens = sum(seqlens)
    flops = step_flops(args, seqlens)
    case = {**asdict(config), "tokens": sweep.tokens, "micro_batches": len(batches)}
    rec = Record("train_step", case, "step", config.kernels, work={"bytes": 0, "flops": flops, "bound": "compute"})
    capacity = torch.cuda.get_device_properties(world.device).total_memory / GIB if world.device.type == "cuda" else H100_80GB_GIB
    memory_plan = plan_memory(recipe_config(sweep, config), args, 1, capacity)
    extra = {"name": config.name, "tokens_per_step": tokens, "plan_peak_gib": memory_plan.peak_gib, "plan_fits": memory_plan.fits,
             "plan_moment": memory_plan.moment}  # fmt: skip
    try:
        with kernel_choice(config.kernels, world.device):
            extra.update(_run(sweep, config, world, batches))
    except Unavailable as e:
        rec.status = f"unavailable: {e}"
    except torch.OutOfMemoryError as e:
        rec.status = f"oom: {str(e).splitlines()[0][:200]}"
    except Exception as e:  # noqa: BLE001  (recorded, printed, and turned into the exit status)
        rec.status = f"error: {type(e).__name__}: {e}".splitlines()[0][:300]
        log(traceback.format_exc())
    torch._dynamo.reset()
    gc.collect()  # the failed config's model and optimizer, now that the exception is gone
    if world.device.type == "cuda":
        torch.cuda.empty_cache()
    if rec.status == "ok":
        rec.median_ms = extra["step_ms"]
        rec.tflops = flops / rec.median_ms / 1e9
        rec.fraction_of_ceiling = rec.tflops / ceilings["matmul_tflops"]
        step_s = rec.median_ms / 1e3
        peak = peak_flops(world.device)
        extra["tokens_per_s"] = tokens / step_s
        extra["mfu"] = flops / step_s / peak if peak else None
        extra["mfu_torchtitan"] = step_flops_torchtitan(args, tokens, sweep.tokens) / step_s / peak if peak else None
        if "peak_reserved_gib" in extra:
            extra["plan_rel_error"] = (memory_plan.peak_gib - extra["peak_reserved_gib"]) / extra["peak_reserved_gib"]
    rec.extra = extra
    return rec


# ---------------------------------------------------------------------------------------------
# The per-layer fit


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def fit_layers(records: list[Record], args: ModelArgs, seqlens: list[int], peak: float | None) -> list[dict]:
    """For each group of ok configs measured at two or more depths, the least-squares line
    forward+backward time = rest + layers * per_layer (rest: embedding, head and loss), with the
    achieved FLOP rates of a layer and of the head (clipping included); and the AdamW phase per
    billion parameters, fitted through the origin (its time is proportional to the parameters)."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        if r.status == "ok":
            groups.setdefault(r.extra["name"].rsplit("-L", 1)[0], []).append(r)
    fits = []
    for group, recs in groups.items():
        layers = [r.case["layers"] for r in recs]
        if len(set(layers)) < 2:
            continue
        per_layer, rest = _line(layers, [r.extra["fwd_bwd_ms"] for r in recs])
        gparams = [replace(args, num_layers=k).num_params() / 1e9 for k in layers]
        optim = sum(r.extra["optim_ms"] * g for r, g in zip(recs, gparams)) / sum(g * g for g in gparams)
        tokens = sum(seqlens)
        per_layer_flops, head = layer_flops(args, seqlens), head_flops(args, tokens)
        fits.append({
            "group": group, **{k: recs[0].case[k] for k in ("kernels", "ac", "compile", "state_dtype")}, "layers": sorted(layers),
            "tokens": tokens, "per_layer_ms": per_layer, "rest_ms": rest, "optim_ms_per_gparam": optim,
            "layer_flops": per_layer_flops, "head_flops": head,
            "layer_tflops": per_layer_flops / per_layer / 1e9 if per_layer > 0 else None,
            "head_tflops": head / rest / 1e9 if rest > 0 else None,
            "layer_mfu": per_layer_flops / (per_layer / 1e3) / peak if peak and per_layer > 0 else None,
        })  # fmt: skip
    return fits


# ---------------------------------------------------------------------------------------------
# Command line


def _row(r: Record) -> str:
    e = r.extra
    head = f"{e['name']:<36}"
    plan = f"plan {e['plan_peak_gib']:6.2f} GiB ({'fits' if e['plan_fits'] else 'does not fit'})"
    if r.status != "ok":
        return f"{head} {r.status[:60]:<60} {plan}"
    mfu = f"{100 * e['mfu']:5.1f}% / {100 * e['mfu_torchtitan']:5.1f}%" if e["mfu"] is not None else "    -  /   -   "
    mem = f"{e['peak_reserved_gib']:6.1f} GiB" if "peak_reserved_gib" in e else "     - GiB"
    return (f"{head} {r.median_ms:9.1f} ms (fwd+bwd {e['fwd_bwd_ms']:9.1f}, optim {e['optim_ms']:7.1f}) "
            f"{e['tokens_per_s']:9.0f} tok/s  MFU {mfu}  peak {mem}  {plan}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="full", help="named sweep (default: full)")
    p.add_argument("--configs", default="", help="comma-separated subset of the sweep's config names (default: all); "
                   + "; ".join(f"{k}: {','.join(c.name for c in s.configs)}" for k, s in SWEEPS.items()))  # fmt: skip
    p.add_argument("--compile", choices=("both", "on", "off"), default="both", help="keep only the configs with torch.compile on / off")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path (default: print only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample lengths and token ids")
    args = p.parse_args(argv)
    sweep = SWEEPS[args.sweep]
    chosen = [c for c in args.configs.split(",") if c]
    names = [c.name for c in sweep.configs]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise SystemExit(refuse(f"unknown configs {unknown} for sweep {args.sweep}; allowed: {names}"))
    configs = [c for c in sweep.configs if (not chosen or c.name in chosen) and args.compile in ("both", "on" if c.compile else "off")]
    if not configs:
        raise SystemExit(refuse(f"no config of sweep {args.sweep} is left by --configs {args.configs!r} and --compile {args.compile}"))
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit(refuse("bench_train_step runs on one device (a world of one); run it without torchrun"))

    world = init_distributed(args.device, 1)
    try:
        batches = micro_batches(sweep.args.vocab_size, sweep.tokens, sweep.micro_batches, args.seed)
        if world.device.type == "cuda":
            batches = [mb.pin_memory() for mb in batches]
        seqlens = [int(n) for mb in batches for n in mb.cu_seqlens.diff().tolist()]  # host data: no device sync
        header = {
            "schema": SCHEMA, "bench": "train_step", "sweep": args.sweep,
            "command": "python -m benchmarks.bench_train_step " + " ".join(sys.argv[1:] if argv is None else argv),
            "environment": environment(world.device), "ceilings": measure_ceilings(world.device), "peak_flops": peak_flops(world.device),
            "model": {k: v for k, v in asdict(sweep.args).items() if k not in ("num_layers", "bos_token_id", "eos_token_id")},
            "dtype": sweep.dtype, "warmup_steps": sweep.warmup, "timed_steps": sweep.steps,
            "micro_batches": [{"tokens": len(mb), "seqlens": mb.cu_seqlens.diff().tolist()} for mb in batches],
        }  # fmt: skip
        if world.device.type == "cuda":
            torch.cuda.empty_cache()  # the ceilings' buffers
        records = []
        for config in configs:
            rec = run_config(sweep, config, world, batches, header["ceilings"], log=lambda line: print(line, file=sys.stderr, flush=True))
            print(_row(rec), file=sys.stderr, flush=True)
            records.append(rec)
        header["fits"] = fit_layers(records, sweep.args, seqlens, header["peak_flops"])
        env = header["environment"]
        print(f"\ntrain_step / sweep {args.sweep} on {env['device']} (torch {env['torch']}, commit {env['commit']}); "
              f"{len(batches)} micro-batches, {sum(seqlens)} tokens in {len(seqlens)} samples per step; MFU: causal / torchtitan")  # fmt: skip
        for r in records:
            print(_row(r))
        for f in header["fits"]:
            mfu = f"{100 * f['layer_mfu']:.1f}%" if f["layer_mfu"] is not None else "-"
            print(f"fit {f['group']}: forward+backward {f['per_layer_ms']:.2f} ms per layer + {f['rest_ms']:.2f} ms (embedding, head, "
                  f"loss); optimizer {f['optim_ms_per_gparam']:.2f} ms per billion parameters; layer MFU {mfu}")  # fmt: skip
        return finish(args.out, header, records)
    finally:
        dist.destroy_process_group()  # a caller in this process (a test) may start another


if __name__ == "__main__":
    sys.exit(main())
