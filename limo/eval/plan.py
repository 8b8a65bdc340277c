r"""How to lay an evaluation over a node's GPUs: tensor parallelism T x data-parallel replicas D.

    python -m limo.eval.plan --model qwen2.5-32b --gpus 8                  # LIMO's 10 benchmarks at 32k tokens
    python -m limo.eval.plan --model runs/limo-32b/hf --benchmarks aime24,math500 --gpus 8
    python -m limo.eval.run ... --plan                                      # the same table, for that run

For each T that the model's shapes divide (heads, MLP width, KV heads) and D = gpus / T:
  - weights per GPU: one rank's shard, counted on the meta device (sampler/parallel.py's split);
  - KV per token per GPU: 2 (K, V) x layers x the rank's KV heads x head_dim x 2 bytes (bf16);
  - KV capacity per GPU in tokens: (memory_fraction x HBM - weights - RESERVE_GIB) / that;
  - concurrent sequences per replica: min(max_num_seqs, capacity / the mean context held), and how
    many chains of the full max_model_len fit at once;
  - decode step time at that batch: max(bytes read / (HBM bandwidth x BW_EFFICIENCY), FLOPs /
    (bf16 peak x MFU)) + 2 all-reduces per layer x ALLREDUCE_US (T > 1) + HOST_MS;
  - wall time: the suite's generated tokens / (D x batch / step), but never less than the longest
    chain alone (max_tokens steps at batch 1): continuous batching cannot beat its tail.

Every constant below is an assumption until a GPU measures it (benchmarks/gpu_suite.sh), and the
plan says so when it prints. Output lengths: the long-CoT proxy's mean (limo/data/lengths.py,
Sky-T1 32B-class outputs on MATH500/AIME/AMC), capped at max_tokens, for every benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from limo.eval.sampler.parallel import ParallelismError, TPLayout, shard_bytes
from limo.model.qwen2 import PRESETS, ModelArgs

GIB = 2**30
HBM_GIB = 79.6  # an H100 SXM's 80 GB as nvidia-smi reports it
HBM_TBPS = 3.35  # H100 SXM datasheet
BW_EFFICIENCY = 0.7  # the sampler's decode goal (ANCHORS.md): 70% of the bandwidth roofline
BF16_TFLOPS = 989.0  # H100 SXM dense bf16 peak
MFU = 0.5  # batch-256 decode matmuls; assumption
ALLREDUCE_US = 12.0  # one NVLink all-reduce of a decode step's [B, 5120] bf16 activations; assumption
HOST_MS = 1.0  # scheduler + inputs + sampling, per step (bench_sampler --host measures it on the host at hand)
RESERVE_GIB = 4.0  # activations of the worst prefill, logits, CUDA graphs' pool; assumption
MEMORY_FRACTION = 0.9  # LLM's default
PROMPT_TOKENS = 200  # a LIMO prompt (system + problem) in Qwen2.5 tokens, about
# LIMO's evaluation files (../shared/data/eval): problems and samples per problem (LIMO's protocol).
LIMO_SUITE = {"aime24": (30, 16), "amc23": (40, 16), "math500": (500, 1), "olympiadbench": (675, 1), "gpqa": (198, 1),
              "minerva": (272, 1), "chmath": (30, 16), "gaokao": (79, 1), "kaoyan": (199, 1), "gradeschool": (210, 1)}  # fmt: skip


@dataclass(frozen=True)
class Choice:
    tp: int
    dp: int
    weights_gib: float  # per GPU
    kv_bytes_per_token: int  # per GPU
    kv_tokens: int  # per GPU (and per replica: every rank holds its heads of every token)
    batch: int  # concurrent sequences per replica at the mean context
    full_chains: int  # sequences of max_model_len that fit at once per replica
    step_ms: float
    hours: float | None  # None: does not fit

    @property
    def fits(self) -> bool:
        return self.hours is not None


def kv_bytes_per_token(layout: TPLayout, itemsize: int = 2) -> int:
    a = layout.args
    return 2 * a.num_layers * layout.kv_heads * a.head_dim * itemsize


def mean_output_tokens(max_tokens: int) -> float:
    from limo.data import lengths

    return statistics.fmean(min(n, max_tokens) for n in lengths.load())


def plan(args: ModelArgs, gpus: int, workload: dict[str, tuple[int, int]], max_tokens: int, max_num_seqs: int = 256,
         mean_tokens: float | None = None, hbm_gib: float = HBM_GIB) -> list[Choice]:  # fmt: skip
    """Every T x D choice on `gpus` GPUs of `hbm_gib` for the workload {benchmark: (problems, samples)}."""
    mean_out = mean_tokens if mean_tokens is not None else mean_output_tokens(max_tokens)
    generated = sum(p * s for p, s in workload.values()) * mean_out
    context = PROMPT_TOKENS + mean_out / 2  # a decoding sequence holds its prompt and, on average, half its output
    params = args.num_params()
    choices = []
    for tp in (t for t in range(1, gpus + 1) if gpus % t == 0):
        try:
            layout = TPLayout(args, 0, tp)
        except ParallelismError:
            continue
        weights = shard_bytes(layout)
        per_token = kv_bytes_per_token(layout)
        free = MEMORY_FRACTION * hbm_gib * GIB - weights - RESERVE_GIB * GIB
        kv_tokens = max(0, int(free // per_token))
        batch = min(max_num_seqs, int(kv_tokens // context))
        full = kv_tokens // (PROMPT_TOKENS + max_tokens)
        if batch < 1 or full < 1:
            choices.append(Choice(tp, gpus // tp, weights / GIB, per_token, kv_tokens, batch, full, float("nan"), None))
            continue

        def step_ms(b: int) -> float:
            memory = (weights + b * context * per_token) / (HBM_TBPS * 1e12 * BW_EFFICIENCY)
            compute = 2 * params / tp * b / (BF16_TFLOPS * 1e12 * MFU)
            comm = 2 * args.num_layers * ALLREDUCE_US * 1e-6 if tp > 1 else 0.0
            return 1e3 * (max(memory, compute) + comm) + HOST_MS

        dp = gpus // tp
        throughput = dp * batch / (step_ms(batch) / 1e3)  # tokens per second, all replicas
        tail = max_tokens * step_ms(1) / 1e3
        choices.append(Choice(tp, dp, weights / GIB, per_token, kv_tokens, batch, full, step_ms(batch), max(generated / throughput, tail) / 3600))
    return choices


def best(choices: list[Choice]) -> Choice | None:
    fitting = [c for c in choices if c.fits]
    return min(fitting, key=lambda c: (c.hours, c.tp)) if fitting else None


def table(choices: list[Choice], gpus: int, max_tokens: int, workload: dict[str, tuple[int, int]], mean_tokens: float | None = None) -> str:
    samples = sum(p * s for p, s in workload.values())
    mean, source = (mean_tokens, "--mean-tokens") if mean_tokens is not None else (mean_output_tokens(max_tokens), "the long-CoT proxy's mean")
    lines = [f"{len(workload)} benchmarks, {samples:,} samples at up to {max_tokens:,} new tokens, on {gpus} GPUs of {HBM_GIB} GiB",
             f"{'TP x DP':>8} {'weights/GPU':>12} {'KV B/token':>11} {'KV tokens/GPU':>14} {'seqs/replica':>13} "
             f"{'full chains':>12} {'step ms':>8} {'wall time':>10}"]  # fmt: skip
    chosen = best(choices)
    for c in choices:
        wall = f"{c.hours * 60:.0f} min" if c.fits else "no fit"
        mark = "  <- best" if c is chosen else ""
        lines.append(f"{c.tp:>3} x {c.dp:<3} {c.weights_gib:>9.1f} GiB {c.kv_bytes_per_token:>11,} {c.kv_tokens:>14,} {c.batch:>13} "
                     f"{c.full_chains:>12} {c.step_ms:>8.1f} {wall:>10}{mark}")  # fmt: skip
    lines.append(f"assumptions (until a GPU measures them): HBM {HBM_TBPS} TB/s at {BW_EFFICIENCY:.0%}, bf16 {BF16_TFLOPS:.0f} "
                 f"TFLOP/s at {MFU:.0%} MFU, {ALLREDUCE_US:.0f} us per all-reduce (2 per layer), {HOST_MS} ms host per step, "
                 f"{RESERVE_GIB} GiB reserved; outputs of {mean:,.0f} tokens on average ({source})")  # fmt: skip
    return "\n".join(lines)


def model_args(spec: str) -> ModelArgs:
    if spec in PRESETS:
        return PRESETS[spec]
    from limo.model.weights import HFCheckpoint

    return HFCheckpoint(spec).args


def workload_of(names: list[str], limit: int | None = None, samples: int | None = None) -> dict[str, tuple[int, int]]:
    unknown = sorted(set(names) - set(LIMO_SUITE))
    if unknown:
        raise ValueError(f"the plan knows LIMO's benchmarks only ({', '.join(LIMO_SUITE)}), not {', '.join(unknown)}")
    return {n: (min(LIMO_SUITE[n][0], limit or LIMO_SUITE[n][0]), samples or LIMO_SUITE[n][1]) for n in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m limo.eval.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-32b", help=f"a model folder or a preset ({', '.join(PRESETS)})")
    p.add_argument("--benchmarks", default=",".join(LIMO_SUITE), help="(default: LIMO's ten)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--mean-tokens", type=float, help="mean output tokens per sample (default: the long-CoT proxy's mean)")
    a = p.parse_args(argv)
    try:
        args = model_args(a.model)
        workload = workload_of([n.strip() for n in a.benchmarks.split(",") if n.strip()])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    choices = plan(args, a.gpus, workload, a.max_tokens, a.max_num_seqs, a.mean_tokens)
    print(table(choices, a.gpus, a.max_tokens, workload, a.mean_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
