"""The LIMO recipe on 1, 2, 4 and 8 nodes of 8 GPUs, on paper: memory and bytes from the simulated
step, time from FLOPs and link bandwidths. Which scale stops hiding communication behind compute?

    python -m benchmarks.project --scale-out [--nodes 1,2,4,8] [--mfu 0.5] [--nvlink-gbps 450] [--ib-gbps 50] [--json]

For each node count n (8n GPUs, HSDP: sharded within a node, replicated across nodes, as
`--parallel.dp_replicate=n` runs it) limo/engine/simulate.py runs the recipe's step (its heaviest
step of the first epoch on rank 0) and gives the per-GPU peak and the bytes each collective moves
per step per GPU. Then, over the recipe's 390 steps as the engine's own loader and packer lay
them out on 8n ranks (limo/data/loader.py, sample lengths from the long-CoT proxy):
    compute(pass)  = max over ranks of the pass's FLOPs / (peak x MFU)        ANCHORS.md's FLOP count
    NVLink(pass)   = (all-gather + reduce-scatter bytes per pass) x 7/8 / NVLink GB/s   within a node
    IB(pass)       = all-reduce bytes per pass x 2 (n - 1) / n / InfiniBand GB/s         across nodes
    a pass takes max(compute, NVLink, IB) when FSDP2's prefetch hides the collectives, their sum when
    nothing overlaps; each step adds the optimizer's pass over its shard (not modelled: < 1%).
Assumptions, printed with the table: the MFU (default 50%, a figure no GPU of ours has measured
yet: the measured per-layer rate of a GPU run replaces it when `benchmarks/results` has one, see
benchmarks/project.py), NVLink 450 GB/s per direction (H100 SXM datasheet), InfiniBand 50 GB/s
per GPU (one 400 Gb/s NDR link each). Ring collectives send (k - 1) / k of a buffer per rank.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from benchmarks.harness import LIMO_RECIPE, rank_passes
from limo.data import lengths as length_dist
from limo.engine.config import load_config
from limo.engine.metrics import PEAK_BF16_FLOPS
from limo.engine.simulate import simulate
from limo.model.flops import step_flops
from limo.model.weights import model_args

GPUS_PER_NODE = 8


@dataclass
class ScaleRow:
    nodes: int
    gpus: int
    peak_gib: float  # simulated, per GPU
    planned_gib: float  # the planner's whole figure, per GPU
    gather_scatter_gb_per_pass: float  # all-gather + reduce-scatter buffers, per GPU
    all_reduce_gb_per_pass: float
    passes_per_step: float  # micro-batch passes per rank per step, dummies included (mean)
    compute_s_per_pass: float  # mean over passes
    nvlink_s_per_pass: float
    ib_s_per_pass: float
    minutes_overlapped: float
    minutes_serial: float
    idle_rank_fraction: float  # rank-passes that hold no sample (a global batch of 32 on more than 32 GPUs)
    simulated_s: float | None = None  # the simulation's own CPU wall time (None: given, not run)

    @property
    def hidden(self) -> bool:
        """Whether the collectives fit inside the compute of a pass (on both links)."""
        return max(self.nvlink_s_per_pass, self.ib_s_per_pass) <= self.compute_s_per_pass


def scale_row(nodes: int, flops_per_s: float, nvlink_gbps: float, ib_gbps: float, simulation: dict | None = None) -> ScaleRow:
    """One node count: simulate it (unless `simulation`, its JSON, is given), then lay out the run,
    each GPU computing at `flops_per_s`."""
    gpus = nodes * GPUS_PER_NODE
    cfg = load_config(LIMO_RECIPE, [f"--parallel.dp_replicate={nodes}"])
    args, _ = model_args(cfg)
    if simulation is None:
        sim = simulate(cfg, gpus)
        simulation = {"peak_gib": sim.peak_gib, "planned_total_gib": sim.plan["peak_gib"], "collectives": sim.collectives,
                      "micro_batches": sim.micro_batches, "seconds": sim.seconds}  # fmt: skip
    passes = len(simulation["micro_batches"])
    moved = simulation["collectives"]
    gather_scatter = (moved.get("all_gather", 0) + moved.get("reduce_scatter", 0)) / passes
    all_reduce = moved.get("all_reduce", 0) / passes
    nvlink = gather_scatter * (GPUS_PER_NODE - 1) / GPUS_PER_NODE / (nvlink_gbps * 1e9)
    ib = all_reduce * 2 * (nodes - 1) / nodes / (ib_gbps * 1e9) if nodes > 1 else 0.0

    sample_lengths = length_dist.draw(817, cfg.train.seed, cap=cfg.data.max_tokens)
    overlapped = serial = compute_total = 0.0
    steps = pass_count = idle = ranks_times_passes = 0
    for step in rank_passes(sample_lengths, samples_per_step=cfg.data.samples_per_step, tokens_per_microbatch=cfg.data.tokens_per_microbatch,
                            epochs=cfg.train.epochs, world_size=gpus, seed=cfg.train.seed):  # fmt: skip
        steps += 1
        for ranks in step:  # every rank runs as many passes as the busiest
            per_rank = [step_flops(args, seqlens) if seqlens else 0.0 for seqlens in ranks]
            compute = max(per_rank) / flops_per_s
            idle += sum(1 for f in per_rank if f == 0.0)
            ranks_times_passes += gpus
            compute_total += compute
            overlapped += max(compute, nvlink, ib)
            serial += compute + nvlink + ib
            pass_count += 1
    return ScaleRow(
        nodes=nodes, gpus=gpus, peak_gib=simulation["peak_gib"], planned_gib=simulation["planned_total_gib"],
        gather_scatter_gb_per_pass=gather_scatter / 1e9, all_reduce_gb_per_pass=all_reduce / 1e9,
        passes_per_step=pass_count / steps, compute_s_per_pass=compute_total / pass_count, nvlink_s_per_pass=nvlink,
        ib_s_per_pass=ib, minutes_overlapped=overlapped / 60, minutes_serial=serial / 60, idle_rank_fraction=idle / ranks_times_passes,
        simulated_s=simulation.get("seconds"),
    )  # fmt: skip


def report(rows: list[ScaleRow], rate: str, nvlink_gbps: float, ib_gbps: float) -> str:
    lines = [
        f"LIMO recipe (Qwen2.5-32B, 817 samples x 15 epochs, 32 per step), HSDP with 8 GPUs per node; compute: {rate}; "
        f"assumed: NVLink {nvlink_gbps:.0f} GB/s, InfiniBand {ib_gbps:.0f} GB/s per GPU",
        f"{'nodes':>5} {'GPUs':>4} {'peak GiB':>8} {'plan GiB':>8} {'AG+RS GB':>8} {'AR GB':>6} {'passes':>6} {'compute s':>9} "
        f"{'NVLink s':>8} {'IB s':>6} {'hidden':>6} {'idle':>5} {'min':>6} {'min serial':>10} {'simulated in':>12}",
    ]
    for r in rows:
        lines.append(
            f"{r.nodes:>5} {r.gpus:>4} {r.peak_gib:>8.1f} {r.planned_gib:>8.1f} {r.gather_scatter_gb_per_pass:>8.1f} "
            f"{r.all_reduce_gb_per_pass:>6.1f} {r.passes_per_step:>6.2f} {r.compute_s_per_pass:>9.2f} {r.nvlink_s_per_pass:>8.2f} "
            f"{r.ib_s_per_pass:>6.2f} {'yes' if r.hidden else 'NO':>6} {100 * r.idle_rank_fraction:>4.0f}% {r.minutes_overlapped:>6.1f} "
            f"{r.minutes_serial:>10.1f} {'-' if r.simulated_s is None else f'{r.simulated_s:.0f} s':>12}"
        )
    exposed = next((r for r in rows if not r.hidden), None)
    lines.append("communication hides behind compute at every scale here" if exposed is None else
                 f"communication stops hiding behind compute at {exposed.nodes} node(s) ({exposed.gpus} GPUs)")  # fmt: skip
    return "\n".join(lines)


def main(args, measured_flops_per_s: float | None = None) -> int:
    """benchmarks/project.py --scale-out: `measured_flops_per_s` is a GPU run's per-layer rate when
    one exists; else the assumed MFU of an H100's dense bf16 peak."""
    if measured_flops_per_s:
        rate, what = measured_flops_per_s, f"{measured_flops_per_s / 1e12:.0f} TFLOP/s per GPU, measured per layer on a GPU"
    else:
        rate = PEAK_BF16_FLOPS["H100"] * args.mfu
        what = f"assumed MFU {100 * args.mfu:.0f}% of 989 TFLOP/s (no GPU measurement yet)"
    rows = [scale_row(n, rate, args.nvlink_gbps, args.ib_gbps) for n in args.nodes]
    if args.json:
        print(json.dumps([{**asdict(r), "hidden": r.hidden} for r in rows]))
    else:
        print(report(rows, what, args.nvlink_gbps, args.ib_gbps))
    return 0

