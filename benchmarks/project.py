"""The LIMO recipe's wall-clock time on one 8 x H100 node, projected from one GPU's measurements.

    python -m benchmarks.project --results benchmarks/results/summary-NVIDIA-H100-80GB-HBM3.json
    python -m benchmarks.project --results benchmarks/results/train_step-NVIDIA-H100-80GB-HBM3.json --nvlink-gbps 360
    python -m benchmarks.project --scale-out       # 1, 2, 4 and 8 nodes from the simulated step (benchmarks/scale_out.py)

Measured (benchmarks/bench_train_step.py, Qwen2.5-32B's layer shapes at k = 2 and 4 layers, on
16,384-token micro-batches): a bench step's forward+backward time = rest + k * per_layer, and the
optimizer phase per billion parameters. With the bench step's FLOPs (ANCHORS.md's count) these
give achieved rates: R_layer = F_layer(bench) / per_layer, R_head = F_head(bench) / rest.

The recipe (configs/limo_qwen2.5_32b_8xh100.toml): 817 samples, 15 epochs, 32 samples per step,
micro-batches of at most 16,384 tokens, 8 GPUs. Sample lengths: 817 draws from the long-CoT proxy
(limo/data/lengths.py), capped at 16,384. The engine's own loader and packer (limo/data/loader.py,
limo/data/packing.py) lay out every step's micro-batches on every rank. Then, with P the parameters:
    t(mb)     = 64 * F_layer(mb) / R_layer + F_head(mb) / R_head
    compute_i = max over ranks of t(micro-batch i)           (ranks meet at every layer's collectives)
    comm      = (2 * 2 B + 4 B) * P * 7/8 / NVLink GB/s      (bf16 all-gather in forward and again in
                backward, fp32 reduce-scatter, every micro-batch: FSDP2 as limo/engine/sharding.py sets it up)
    step      = sum_i max(compute_i, comm)  [overlapped]  or  sum_i (compute_i + comm)  [not overlapped]
                + optimizer_ms_per_gparam * P / 8             (each GPU updates its shard)
    total     = sum over the 390 steps
Assumptions: time scales with FLOPs at the measured rates (a part-filled micro-batch runs at the
full one's rate: optimistic for small ones); NVLink at the given bandwidth per direction (the
datasheet's 450 GB/s for H100 SXM by default, not a measurement). The per-GPU memory comes from
engine.memory.plan_memory for the recipe with the measured configuration's choices.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import scale_out
from benchmarks.harness import LIMO_RECIPE, rank_passes
from limo.data import lengths as length_dist
from limo.engine.config import load_config
from limo.engine.context import cp_bytes_per_pass
from limo.engine.memory import H100_80GB_GIB, plan_memory
from limo.model.flops import head_flops, layer_flops
from limo.model.qwen2 import PRESETS

TARGET = PRESETS["qwen2.5-32b"]
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")
ANCHORS_TOKENS_PER_EPOCH = 4_000_000  # ANCHORS.md's estimate from LIMO's 16.1 MB
FIT_KEYS = ("group", "ac", "compile", "state_dtype", "per_layer_ms", "rest_ms", "optim_ms_per_gparam", "layer_flops", "head_flops")


class MissingMeasurements(ValueError):
    """The results file lacks what the projection needs; the message says what and how to get it."""


@dataclass(frozen=True)
class Recipe:
    samples: int = 817
    epochs: int = 15
    samples_per_step: int = 32
    tokens_per_microbatch: int = 16384
    world_size: int = 8
    seed: int = 0
    cp: int = 1  # context parallelism: ranks sharing each micro-batch (the 32k and 64k recipes: 2 and 4)


@dataclass
class Projection:
    fit: dict
    device: str
    tokens_per_epoch: int
    steps: int
    passes_per_rank: int  # micro-batch passes each rank runs, dummies included
    compute_s: float
    comm_per_pass_s: float
    optimizer_per_step_s: float
    minutes_overlapped: float
    minutes_not_overlapped: float
    memory_gib: float
    memory_capacity_gib: float
    fits_memory: bool
    r_layer_tflops: float
    r_head_tflops: float
    cp_comm_s: float = 0.0  # context parallelism's K/V collectives over the run, per rank
    cp_hidden: bool = True  # each pass's cp collectives (with FSDP's) take no longer than its compute


def load_results(path: Path) -> dict:
    """A bench_train_step JSON, or a summary whose "train_step" section holds the same keys."""
    if not path.is_file():
        raise MissingMeasurements(
            f"{path} does not exist: the projection needs measurements from a GPU; run `bash benchmarks/gpu_suite.sh train` "
            "there (benchmarks/README.md) and pass the train_step or summary JSON it writes"
        )
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MissingMeasurements(f"{path}: not valid JSON ({e})") from None
    if "goals" in payload and "train_step" not in payload:  # a summary built without the train stage
        why = payload.get("missing", {}).get("train_mfu_32b_layers", "no train_step section")
        raise MissingMeasurements(f"{path}: a summary without train-step measurements ({why})")
    section = payload.get("train_step", payload)
    missing = [k for k in ("model", "fits", "environment") if k not in section]
    if missing:
        raise MissingMeasurements(f"{path}: no train-step measurements (missing keys {missing}); "
                                  "it must come from bench_train_step or benchmarks.summary")
    return section


def recipe_memory(fit: dict, world_size: int, recipe: Recipe | None = None):
    recipe = recipe or Recipe()
    cfg = load_config(LIMO_RECIPE, [
        "--model.path=none", "--model.preset=qwen2.5-32b", f"--parallel.activation_checkpointing={fit['ac']}",
        f"--parallel.compile={fit['compile'] and recipe.cp == 1}", f"--optim.state_dtype={fit['state_dtype']}",
        f"--parallel.cp={recipe.cp}", f"--data.tokens_per_microbatch={recipe.tokens_per_microbatch}",
        f"--data.max_tokens={recipe.tokens_per_microbatch}",
    ])  # fmt: skip
    return plan_memory(cfg, TARGET, world_size, H100_80GB_GIB)


def choose_fit(section: dict, group: str | None = None, world_size: int = 8) -> dict:
    """The named fit, or the fastest per layer among those whose configuration fits 8 x 80 GB."""
    shapes = {k: section["model"].get(k) for k in SHAPE_KEYS}
    want = {k: getattr(TARGET, k) for k in SHAPE_KEYS}
    if shapes != want:
        raise MissingMeasurements(f"the measurements are of other shapes {shapes}, not Qwen2.5-32B's {want}: use the full sweep's results")
    fits = section["fits"]
    if not fits:
        statuses = {r["extra"].get("name", r["key"]): r["status"] for r in section.get("records", [])}
        raise MissingMeasurements(f"no per-layer fit: one config must run ok at two depths "
                                  f"(config statuses: {statuses or 'none recorded'})")
    for f in fits:
        absent = [k for k in FIT_KEYS if k not in f]
        if absent:
            raise MissingMeasurements(f"fit {f.get('group')!r} lacks {absent}")
        if not (f["per_layer_ms"] > 0 and f["rest_ms"] > 0 and f["optim_ms_per_gparam"] > 0):
            raise MissingMeasurements(f"fit {f['group']!r} has a non-positive time (per layer {f['per_layer_ms']}, rest {f['rest_ms']}, "
                                      f"optimizer {f['optim_ms_per_gparam']}): too noisy to project from; measure again")  # fmt: skip
    if group is not None:
        named = [f for f in fits if f["group"] == group]
        if not named:
            raise MissingMeasurements(f"no fit named {group!r}; measured: {[f['group'] for f in fits]}")
        return named[0]
    fitting = [f for f in fits if recipe_memory(f, world_size).fits]
    if not fitting:
        raise MissingMeasurements(f"no measured configuration fits {world_size} x 80 GB by the planner: {[f['group'] for f in fits]}")
    return min(fitting, key=lambda f: f["per_layer_ms"])


def sample_lengths(recipe: Recipe, pool: list[int], tokens_per_epoch: int | None = None) -> list[int]:
    """The recipe's sample lengths drawn from `pool`, scaled (when a token count per epoch is
    asked for) by the factor that brings their capped total to it."""
    if tokens_per_epoch is None:
        return length_dist.draw(recipe.samples, recipe.seed, cap=recipe.tokens_per_microbatch, lengths=pool)
    lo, hi = 0.0, 64.0
    for _ in range(60):  # bisection on the scale: the capped total grows with it
        mid = (lo + hi) / 2
        total = sum(length_dist.draw(recipe.samples, recipe.seed, cap=recipe.tokens_per_microbatch, scale=mid, lengths=pool))
        lo, hi = (mid, hi) if total < tokens_per_epoch else (lo, mid)
    return length_dist.draw(recipe.samples, recipe.seed, cap=recipe.tokens_per_microbatch, scale=hi, lengths=pool)


def project(section: dict, recipe: Recipe = Recipe(), nvlink_gbps: float = 450.0, group: str | None = None,
            pool: list[int] | None = None, tokens_per_epoch: int | None = None) -> Projection:  # fmt: skip
    fit = choose_fit(section, group, recipe.world_size)
    r_layer = fit["layer_flops"] / (fit["per_layer_ms"] / 1e3)  # FLOP/s
    r_head = fit["head_flops"] / (fit["rest_ms"] / 1e3)
    lengths = sample_lengths(recipe, pool if pool is not None else length_dist.load(), tokens_per_epoch)
    params = TARGET.num_params()
    share = (recipe.world_size - 1) / recipe.world_size
    comm = (2 * 2 + 4) * params * share / (nvlink_gbps * 1e9)
    optimizer = fit["optim_ms_per_gparam"] / 1e3 * params / 1e9 / recipe.world_size

    def seconds(seqlens: list[int]) -> float:
        if not seqlens:
            return 0.0  # a dummy pass: one token
        return TARGET.num_layers * layer_flops(TARGET, seqlens) / r_layer + head_flops(TARGET, sum(seqlens)) / r_head

    steps = passes = 0
    compute = overlapped = serial = 0.0
    cp_comm_total, cp_hidden = 0.0, True
    for step in rank_passes(lengths, samples_per_step=recipe.samples_per_step, tokens_per_microbatch=recipe.tokens_per_microbatch,
                            epochs=recipe.epochs, world_size=recipe.world_size // recipe.cp, seed=recipe.seed):
        steps += 1
        passes += len(step)
        for ranks in step:
            # a cp group shares each micro-batch: 1/cp of its FLOPs per rank (the split balances causal work)
            c = max(seconds(seqlens) for seqlens in ranks) / recipe.cp
            kv = max(cp_bytes_per_pass(TARGET, sum(seqlens), recipe.cp) for seqlens in ranks) / (nvlink_gbps * 1e9)
            compute += c
            cp_comm_total += kv
            cp_hidden &= comm + kv <= c
            overlapped += max(c, comm + kv)
            serial += c + comm + kv
    overlapped += steps * optimizer
    serial += steps * optimizer
    memory = recipe_memory(fit, recipe.world_size, recipe)
    return Projection(
        fit=fit, device=section["environment"]["device"], tokens_per_epoch=sum(lengths), steps=steps, passes_per_rank=passes,
        compute_s=compute, comm_per_pass_s=comm, optimizer_per_step_s=optimizer, minutes_overlapped=overlapped / 60,
        minutes_not_overlapped=serial / 60, memory_gib=memory.peak_gib, memory_capacity_gib=memory.capacity_gib,
        fits_memory=memory.fits, r_layer_tflops=r_layer / 1e12, r_head_tflops=r_head / 1e12, cp_comm_s=cp_comm_total, cp_hidden=cp_hidden,
    )  # fmt: skip


def report(p: Projection, section: dict, recipe: Recipe, nvlink_gbps: float, anchors: Projection | None = None) -> str:
    f = p.fit
    env = section["environment"]
    params = TARGET.num_params()
    lines = [
        f"LIMO recipe on one {recipe.world_size} x H100 node, projected from {p.device} (commit {env.get('commit')}, {env.get('date')})",
        f"fit {f['group']} (layers {f.get('layers')}): bench step forward+backward = "
        f"{f['rest_ms']:.2f} ms + k x {f['per_layer_ms']:.2f} ms",
        f"  R_layer = {f['layer_flops']:.4g} FLOP / {f['per_layer_ms']:.2f} ms = {p.r_layer_tflops:.1f} TFLOP/s"
        + (f"  (layer MFU {100 * f['layer_mfu']:.1f}%)" if f.get("layer_mfu") else ""),
        f"  R_head  = {f['head_flops']:.4g} FLOP / {f['rest_ms']:.2f} ms = {p.r_head_tflops:.1f} TFLOP/s",
        f"data: {recipe.samples} samples from the long-CoT proxy, capped at {recipe.tokens_per_microbatch}: "
        f"{p.tokens_per_epoch / 1e6:.2f} M tokens per epoch, {recipe.epochs * p.tokens_per_epoch / 1e6:.1f} M in {recipe.epochs} epochs",
        f"steps: {recipe.epochs} x ceil({recipe.samples} / {recipe.samples_per_step}) = {p.steps}; "
        f"{p.passes_per_rank} micro-batch passes per rank ({p.passes_per_rank / p.steps:.2f} per step)",
        f"compute: sum over passes of max over ranks of 64 x F_layer / R_layer + F_head / R_head = {p.compute_s:.0f} s",
        f"comm per pass: (2 x 2 B + 4 B) x {params / 1e9:.2f} B params x {recipe.world_size - 1}/{recipe.world_size} "
        f"/ {nvlink_gbps:.0f} GB/s = {p.comm_per_pass_s:.3f} s; x {p.passes_per_rank} passes = {p.comm_per_pass_s * p.passes_per_rank:.0f} s",
        f"optimizer per step: {f['optim_ms_per_gparam']:.2f} ms per B params x {params / 1e9:.2f} B / {recipe.world_size} "
        f"= {1e3 * p.optimizer_per_step_s:.1f} ms; x {p.steps} steps = {p.optimizer_per_step_s * p.steps:.0f} s",
        *([f"context parallel (cp={recipe.cp}): per layer a K/V all-gather in forward and in the recompute, a reduce-scatter in "
           f"backward = {p.cp_comm_s:.0f} s over the run per rank; "
           + ("hidden behind compute on every pass" if p.cp_hidden else "NOT hidden behind compute on every pass")] if recipe.cp > 1 else []),
        f"total: {p.minutes_overlapped:.1f} min with communication overlapped, {p.minutes_not_overlapped:.1f} min without",
        f"memory per GPU (engine.memory, ac={f['ac']}, optimizer state {f['state_dtype']}): {p.memory_gib:.1f} GiB of "
        f"{p.memory_capacity_gib:.1f} usable: {'fits' if p.fits_memory else 'DOES NOT FIT'}, no offload",
    ]
    if anchors is not None:
        lines.append(f"at ANCHORS.md's ~{ANCHORS_TOKENS_PER_EPOCH / 1e6:.0f} M tokens per epoch (the proxy's lengths scaled up; LIMO's "
                     f"answers are longer than the proxy's): {anchors.minutes_overlapped:.1f} min overlapped, "
                     f"{anchors.minutes_not_overlapped:.1f} min not")  # fmt: skip
    lines.append(f"goal (<= 60 min, within 80 GB per GPU, no offload): {verdict(p)} at the proxy's tokens"
                 + (f"; {verdict(anchors)} at ANCHORS.md's" if anchors is not None else ""))
    return "\n".join(lines)


def verdict(p: Projection) -> str:
    """The goal judged with and without overlap of communication and compute."""
    if not p.fits_memory:
        return "NOT met (memory)"
    if p.minutes_not_overlapped <= 60:
        return "met"
    return "met only with communication overlapped" if p.minutes_overlapped <= 60 else "NOT met"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.project", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--results", type=Path, help="train_step-<device>.json or summary-<device>.json from a GPU run")
    ap.add_argument("--scale-out", action="store_true", help="the recipe on --nodes nodes of 8 GPUs, from the simulated step "
                                                             "(benchmarks/scale_out.py); --results, when given, supplies the compute rate")
    ap.add_argument("--nodes", default="1,2,4,8", help="node counts for --scale-out (default 1,2,4,8)")
    ap.add_argument("--mfu", type=float, default=0.5, help="--scale-out without --results: the assumed MFU (default 0.5)")
    ap.add_argument("--ib-gbps", type=float, default=50.0, help="--scale-out: InfiniBand GB/s per GPU (default 50: one 400 Gb/s NDR link)")
    ap.add_argument("--fit", default=None, help="the fit (config group) to project from; default: the fastest that fits 8 x 80 GB")
    ap.add_argument("--nvlink-gbps", type=float, default=450.0,
                    help="NVLink bandwidth per direction, GB/s (default 450: the H100 SXM datasheet)")  # fmt: skip
    ap.add_argument("--lengths", type=Path, default=length_dist.DATA_FILE, help="length distribution (default: the committed proxy)")
    ap.add_argument("--cp", type=int, default=1, help="context parallelism of the recipe (2: the 32k recipe, 4: the 64k one)")
    ap.add_argument("--tokens-per-microbatch", type=int, default=16384, help="the recipe's micro-batch (and longest sample) in tokens")
    ap.add_argument("--json", action="store_true", help="print the projection as one JSON object")
    args = ap.parse_args(argv)
    if args.scale_out:
        args.nodes = [int(n) for n in args.nodes.split(",") if n]
        try:
            measured = project(load_results(args.results), Recipe(), args.nvlink_gbps, args.fit).r_layer_tflops * 1e12 if args.results else None
        except (MissingMeasurements, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return scale_out.main(args, measured)
    if args.results is None:
        ap.error("--results is required (or --scale-out)")
    try:
        section = load_results(args.results)
        pool = length_dist.load(args.lengths)
        recipe = Recipe(cp=args.cp, tokens_per_microbatch=args.tokens_per_microbatch)
        p = project(section, recipe, args.nvlink_gbps, args.fit, pool)
        anchors = project(section, recipe, args.nvlink_gbps, args.fit, pool, ANCHORS_TOKENS_PER_EPOCH)
    except (MissingMeasurements, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"proxy": asdict(p), "anchors_tokens": asdict(anchors)}))
    else:
        print(report(p, section, recipe, args.nvlink_gbps, anchors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
