"""Sampler throughput: decode tokens/s from batch 1 to 256 against the bandwidth roofline, prefill
tokens/s, and transformers' `generate` on the same model folder as the comparator.

    python -m benchmarks.bench_sampler                          # the full sweep on one GPU (Qwen2.5-7B shapes)
    python -m benchmarks.bench_sampler --batches 1,64,256 --out sampler.json
    TRITON_INTERPRET=1 python -m benchmarks.bench_sampler --sweep smoke --kernels torch
    python -m benchmarks.bench_sampler --host        # the host side per decode step, no GPU (bench_sampler_cpu.py)
    python -m benchmarks.bench_sampler --contexts    # the CPU path's decode time by context

The model has a real architecture's shapes and random weights, written to a temporary folder by
model.weights.save_pretrained without a tokenizer and without an EOS id, so prompts are token
ids and every sample runs to max_tokens. For each batch size B: B random prompts of P tokens,
greedy, through `LLM.generate` (eval/sampler) with max_tokens=N and with max_tokens=1, after one
untimed run (a batch size's first pays for CUDA graph capture), medians of the sweep's reps:
    prefill tokens/s = B * P / t(1)
    decode tokens/s  = B * (N - 1) / (t(N) - t(1))          (the N - 1 decode steps)
A decode step must read every weight it uses once (the whole model but the embedding table, of
which B rows) and every live K/V once; step i (1 .. N-1) attends over P + i tokens per sample:
    bytes_i = W + B * (P + i) * kv_bytes_per_token
    roofline tokens/s = B * (N - 1) * BW / sum_i bytes_i,    BW = the measured copy bandwidth
A decode record's fraction_of_ceiling is its tokens/s over that roofline. transformers runs the
same folder on the same prompts (greedy, N_hf new tokens, its default cache) the same way; the
greedy tokens of the first prompt are compared (a check that both ran the same model, not a
test: in bf16 a near-tie may flip an argmax and the outputs part ways).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from limo import kernels
from benchmarks import bench_sampler_cpu
from benchmarks.harness import SCHEMA, Record, Work, environment, finish, measure_ceilings, print_table
from limo.model.flops import forward_flops
from limo.model.init import init_weights
from limo.model.qwen2 import PRESETS, ModelArgs, build_model
from limo.model.weights import save_pretrained
from limo.tools.dtypes import dtype_of
from limo.tools.errors import refuse


@dataclass(frozen=True)
class Sweep:
    args: ModelArgs
    dtype: str
    prompt: int  # P, tokens per prompt
    new_tokens: int  # N, ours
    hf_new_tokens: int  # N_hf, transformers (slower, so fewer)
    batches: tuple[int, ...]
    reps: int  # timings per measurement; the median is kept
    block_size: int
    max_num_batched_tokens: int


SWEEPS = {
    "full": Sweep(PRESETS["qwen2.5-7b"], "bfloat16", 128, 256, 64, (1, 2, 4, 8, 16, 32, 64, 128, 256), 3, 16, 16384),
    "quick": Sweep(PRESETS["qwen2.5-7b"], "bfloat16", 128, 128, 32, (1, 64, 256), 1, 16, 16384),  # gpu_suite.sh quick
    "smoke": Sweep(ModelArgs(203, 48, 100, 2, 6, 1, rope_theta=10_000.0), "float32", 8, 5, 5, (1, 3), 3, 4, 64),  # 3: a busy CPU
}


# ---------------------------------------------------------------------------------------------
# Accounting


def kv_bytes_per_token(args: ModelArgs, itemsize: int) -> int:
    return 2 * args.num_layers * args.num_kv_heads * args.head_dim * itemsize


def decode_weight_bytes(args: ModelArgs, itemsize: int, batch: int) -> int:
    """Bytes of weights one decode step reads: all of them, except that an untied embedding
    table is read only at the batch's B token rows."""
    table = 0 if args.tie_word_embeddings else args.vocab_size * args.hidden_size
    return (args.num_params() - table + batch * args.hidden_size) * itemsize


def decode_step_bytes(args: ModelArgs, itemsize: int, batch: int, prompt: int, new_tokens: int) -> float:
    """Mean bytes over the N - 1 decode steps: weights plus the live K/V of P + i tokens per sample."""
    kv = kv_bytes_per_token(args, itemsize)
    steps = range(1, new_tokens)
    return statistics.fmean(decode_weight_bytes(args, itemsize, batch) + batch * (prompt + i) * kv for i in steps)


# ---------------------------------------------------------------------------------------------
# Runs


def make_model_folder(args: ModelArgs, dtype: torch.dtype, device: torch.device, path: Path, seed: int = 0) -> None:
    """Random weights (initialised on `device`, fast at 7B) written as an HF folder."""
    model = build_model(args, device="meta", dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model, seed=seed)
    save_pretrained(model, path, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _median_pair(run, new_tokens: int, reps: int, device: torch.device) -> tuple[float, float, list[int]]:
    """Median seconds of run(N) and of run(1), interleaved, after an untimed run(2) (a batch size's
    first run pays for CUDA graph capture, kernel selection and the allocator's growth); and the
    first prompt's N greedy tokens."""
    _timed(lambda: run(2), device)
    long, short, tokens = [], [], []
    for _ in range(reps):
        t, tokens = _timed(lambda: run(new_tokens), device)
        long.append(t)
        short.append(_timed(lambda: run(1), device)[0])
    return statistics.median(long), statistics.median(short), tokens


def _records(provider: str, sweep: Sweep, batch: int, n: int, t_long: float, t_short: float, ceilings: dict) -> list[Record]:
    itemsize = dtype_of(sweep.dtype).itemsize
    case = {"batch": batch, "prompt": sweep.prompt, "new_tokens": n}
    flops = int(forward_flops(sweep.args, [sweep.prompt] * batch))
    pre = Record("sampler", case, "prefill", provider, work=asdict(Work(flops=flops, bound="compute")))
    pre.median_ms = t_short * 1e3
    pre.tflops = pre.work["flops"] / pre.median_ms / 1e9
    pre.fraction_of_ceiling = pre.tflops / ceilings["matmul_tflops"]
    pre.extra = {"tokens_per_s": batch * sweep.prompt / t_short}
    step_bytes = decode_step_bytes(sweep.args, itemsize, batch, sweep.prompt, n)
    dec = Record("sampler", case, "decode", provider, work=asdict(Work(bytes=int(step_bytes), bound="memory")))
    decode_s = t_long - t_short
    if decode_s <= 0:
        dec.status = f"error: decode time {decode_s:.4f} s <= 0 (t(N) {t_long:.4f} s, t(1) {t_short:.4f} s): too noisy, raise new_tokens"
    else:
        dec.median_ms = decode_s / (n - 1) * 1e3
        dec.gbps = step_bytes / dec.median_ms / 1e6
        dec.fraction_of_ceiling = dec.gbps / ceilings["copy_gbps"]
        roofline = batch * ceilings["copy_gbps"] * 1e9 / step_bytes
        dec.extra = {"tokens_per_s": batch * (n - 1) / decode_s, "roofline_tokens_per_s": roofline}
    return [pre, dec]


Run = tuple[list[Record], list[int]]  # the records, and the first prompt's greedy tokens


def run_ours(folder: Path, sweep: Sweep, prompts: list[list[int]], device: torch.device, ceilings: dict, log) -> Run:
    from limo.eval.sampler import LLM, SamplingParams

    longest = sweep.prompt + sweep.new_tokens
    pages = -(-longest // sweep.block_size) * max(sweep.batches) + max(sweep.batches)
    llm = LLM(folder, dtype=sweep.dtype, device=device, block_size=sweep.block_size, num_blocks=pages, max_num_seqs=max(sweep.batches),
              max_model_len=longest, max_num_batched_tokens=max(sweep.max_num_batched_tokens, longest))  # fmt: skip
    records, first = [], []
    for batch in sweep.batches:
        def run(n, batch=batch):
            outs = llm.generate(prompts[:batch], SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
            return outs[0].token_ids

        t_long, t_short, tokens = _median_pair(run, sweep.new_tokens, sweep.reps, device)
        first = first or tokens
        records += _records("ours", sweep, batch, sweep.new_tokens, t_long, t_short, ceilings)
        log(records[-1])
    return records, first


def run_transformers(folder: Path, sweep: Sweep, prompts: list[list[int]], device: torch.device, ceilings: dict, log) -> Run:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype_of(sweep.dtype)).to(device).eval()
    records, first = [], []
    for batch in sweep.batches:
        ids = torch.tensor(prompts[:batch], device=device)  # [B, P]: equal lengths, no padding

        def run(n, ids=ids):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                     pad_token_id=0)  # fmt: skip
            return out[0, ids.shape[1] :].tolist()

        t_long, t_short, tokens = _median_pair(run, sweep.hf_new_tokens, sweep.reps, device)
        first = first or tokens
        records += _records("transformers", sweep, batch, sweep.hf_new_tokens, t_long, t_short, ceilings)
        log(records[-1])
    return records, first


def compare(records: list[Record]) -> None:
    """Each of our decode records gets vs_transformers: our tokens/s over transformers' at that batch."""
    theirs = {r.case["batch"]: r for r in records if r.provider == "transformers" and r.mode == "decode" and r.status == "ok"}
    for r in records:
        hf = theirs.get(r.case["batch"])
        if r.provider == "ours" and r.mode == "decode" and r.status == "ok" and hf is not None:
            r.extra["vs_transformers"] = r.extra["tokens_per_s"] / hf.extra["tokens_per_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sampler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sweeps = "; ".join(f"{k}: {s.args.num_layers} layers x {s.args.hidden_size}, batches {s.batches}" for k, s in SWEEPS.items())
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="full", help=f"named sweep (default: full): {sweeps}")
    p.add_argument("--batches", default="", help="comma-separated subset of the sweep's batch sizes")
    p.add_argument("--providers", default="ours,transformers", help="comma-separated subset of ours,transformers")
    p.add_argument("--kernels", choices=kernels.BACKENDS, default="auto", help="kernel backend of our sampler (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path (default: print only)")
    p.add_argument("--host", action="store_true", help="the host side per decode step, with a null model (bench_sampler_cpu.py)")
    p.add_argument("--tp", default="1,2", help="--host: tensor-parallel sizes whose rank-0 host work is measured (default 1,2)")
    p.add_argument("--contexts", nargs="?", const="256,1024,4096",
                   help="CPU time per decode step of the tiny model at these contexts (default 256,1024,4096)")
    args = p.parse_args(argv)
    if args.host or args.contexts:
        args.host_batches = tuple(int(b) for b in args.batches.split(",") if b) or (1, 64, 256)
        args.host_tp = tuple(int(t) for t in args.tp.split(",") if t)
        args.contexts = [int(c) for c in (args.contexts or "").split(",") if c]
        return bench_sampler_cpu.main(args)
    sweep = SWEEPS[args.sweep]
    batches = tuple(int(b) for b in args.batches.split(",") if b) or sweep.batches
    providers = [x for x in args.providers.split(",") if x]
    if set(batches) - set(sweep.batches) or set(providers) - {"ours", "transformers"} or not providers:
        raise SystemExit(refuse(f"batches {list(batches)} must be among {list(sweep.batches)}; providers {providers} among ours,transformers"))
    sweep = replace(sweep, batches=batches)
    device = torch.device(args.device)
    model_args = replace(sweep.args, eos_token_id=None)  # no EOS: every sample runs to max_tokens, in both samplers
    sweep = replace(sweep, args=model_args)
    kernels.set_backend(args.kernels)
    command = "python -m benchmarks.bench_sampler " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args, sweep, providers, device, command)
    finally:
        kernels.set_backend("auto")


def _run(args: argparse.Namespace, sweep: Sweep, providers: list[str], device: torch.device, command: str) -> int:
    model_args, batches = sweep.args, sweep.batches
    itemsize = dtype_of(sweep.dtype).itemsize
    header = {
        "schema": SCHEMA, "bench": "sampler", "sweep": args.sweep,
        "command": command, "environment": environment(device), "ceilings": measure_ceilings(device),
        "kernels": kernels.backend(device.type),
        "model": {k: v for k, v in asdict(model_args).items() if k not in ("bos_token_id", "eos_token_id")}, "dtype": sweep.dtype,
        "prompt": sweep.prompt, "new_tokens": sweep.new_tokens, "hf_new_tokens": sweep.hf_new_tokens, "reps": sweep.reps,
        "weight_bytes": decode_weight_bytes(model_args, itemsize, 0), "kv_bytes_per_token": kv_bytes_per_token(model_args, itemsize),
    }  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model_args.vocab_size, (max(batches), sweep.prompt), generator=g).tolist()

    def log(r: Record) -> None:
        rate = f"{r.extra['tokens_per_s']:.0f} tok/s, {100 * r.fraction_of_ceiling:.1f}% of the roofline" if r.status == "ok" else r.status
        print(f"{r.provider} batch {r.case['batch']}: decode {rate}", file=sys.stderr, flush=True)

    records, first = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        folder = Path(tmp) / "model"
        make_model_folder(model_args, dtype_of(sweep.dtype), device, folder)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for name, run in (("ours", run_ours), ("transformers", run_transformers)):
            if name in providers:
                recs, first[name] = run(folder, sweep, prompts, device, header["ceilings"], log)
                records += recs
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # free one sampler's weights and cache before the other loads
    compare(records)
    if len(first) == 2:
        n = min(len(first["ours"]), len(first["transformers"]))
        agree = next((i for i in range(n) if first["ours"][i] != first["transformers"][i]), n)
        header["greedy_agreement"] = {"tokens_compared": n, "identical_prefix": agree}
    print_table(header, records)
    for r in records:
        if r.mode == "decode" and r.status == "ok":
            vs = f", {r.extra['vs_transformers']:.1f}x transformers" if "vs_transformers" in r.extra else ""
            print(f"{r.provider:<12} batch {r.case['batch']:>3}: decode {r.extra['tokens_per_s']:10.0f} tok/s of a roofline of "
                  f"{r.extra['roofline_tokens_per_s']:10.0f} ({100 * r.fraction_of_ceiling:5.1f}%){vs}")  # fmt: skip
    if "greedy_agreement" in header:
        a = header["greedy_agreement"]
        print(f"greedy tokens of prompt 0, ours vs transformers: identical for {a['identical_prefix']} of {a['tokens_compared']}")
    return finish(args.out, header, records)


if __name__ == "__main__":
    sys.exit(main())
