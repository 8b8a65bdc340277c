"""What every benchmark script shares: the timing harness, the kernels a model runs on, and the
LIMO recipe's shapes. Scripts import helpers from here only; the aggregators (regression.py for
CI, summary.py and project.py for a GPU run) call the scripts' own measurement functions.

Providers x sweep -> median ms, GB/s or TFLOP/s, fraction of the device's measured ceiling,
peak memory -> JSON (for benchmarks/compare.py) and a printed table.

A benchmark script names its providers (ours, torch eager, torch.compile, Liger, ...) and its
sweeps (named lists of cases), and says for each case and mode how many bytes must move or how
many FLOPs must be done. The harness measures the device's two ceilings once per run (a large
device-to-device copy, counting bytes read plus written; a large bf16 matmul), times each
provider (CUDA: `triton.testing.do_bench`, median of CUDA-event timings with the L2 flushed
between runs; CPU: median of `time.perf_counter` runs, for smoke runs only), records the peak
memory a run adds on the GPU, and writes one JSON record per (case, mode, provider).

A provider that cannot run here (a package missing; a comparator's Triton kernels that fail in
Triton's CPU interpreter, which is a stand-in for a GPU and not every kernel runs in it) is
recorded as "unavailable: why", and one that fails as "error: why"; both appear in the table and
the JSON, errors make the exit status non-zero, and `--strict` makes unavailability an error too.
Our own providers ("ours") failing is always an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from limo import kernels
from limo.kernels.dispatch import swapped_kernels
from limo.data.dataset import EncodedSample
from limo.data.loader import PackedLoader
from limo.data.packing import plan
from limo.tools.errors import refuse

SCHEMA = 1
ROOT = Path(__file__).resolve().parents[1]
LIMO_RECIPE = ROOT / "configs" / "limo_qwen2.5_32b_8xh100.toml"  # the run the benchmarks measure pieces of


class Unavailable(Exception):
    """Raised by a provider's builder when it cannot run here (the message says why)."""


@dataclass
class Work:
    """What one call must do at least: bytes through device memory, or FLOPs (whichever bounds it)."""

    bytes: int = 0
    flops: int = 0
    bound: str = "memory"  # "memory" (judged against copy bandwidth) or "compute" (bf16 matmul rate)


@dataclass
class Runnable:
    """One timed call, and the tensors whose .grad is reset before each call (as do_bench does)."""

    fn: Callable[[], Any]
    grads: Sequence[torch.Tensor] = ()


@dataclass
class Record:
    bench: str
    case: dict
    mode: str
    provider: str
    status: str = "ok"
    median_ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    fraction_of_ceiling: float | None = None
    peak_extra_bytes: int | None = None
    work: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # bench-specific figures (tokens/s, MFU, memory plan, ...)

    @property
    def key(self) -> str:
        """Stable identity for comparing runs: bench/case/mode/provider."""
        case = ",".join(f"{k}={v}" for k, v in self.case.items())
        return f"{self.bench}/{case}/{self.mode}/{self.provider}"


Builder = Callable[[dict, str, torch.device], Runnable]  # (case, mode, device) -> Runnable


# ---------------------------------------------------------------------------------------------
# Device facts and ceilings


def environment(device: torch.device) -> dict:
    """Device name and software versions, and the git commit the numbers belong to."""
    import triton

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        info["commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None  # not a git checkout (e.g. an installed package)
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        info["liger_kernel"] = version("liger-kernel")
    except ImportError:
        info["liger_kernel"] = None
    return info


def measure_ceilings(device: torch.device, warmup_ms: float = 25, rep_ms: float = 200) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured here.

    CPU numbers come from small sizes and fp32 matmul: they only give smoke runs a scale.
    """
    if device.type == "cuda":
        n_bytes, n, dtype = 1 << 30, 8192, torch.bfloat16
    else:
        n_bytes, n, dtype = 1 << 26, 512, torch.float32
    src = torch.randn(n_bytes // 4, device=device)  # random data: zeros can run faster than real data
    dst = torch.empty_like(src)
    copy_ms = time_ms(Runnable(lambda: dst.copy_(src)), device, warmup_ms, rep_ms)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    mm_ms = time_ms(Runnable(lambda: a @ b), device, warmup_ms, rep_ms)
    return {
        "copy_gbps": 2 * n_bytes / copy_ms / 1e6,
        "copy_bytes": n_bytes,
        "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(run: Runnable) -> None:
    for t in run.grads:
        t.grad = None


def time_ms(run: Runnable, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of one call. CUDA: do_bench (events, L2 flushed); CPU: perf_counter."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(run.fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(run.grads) or None, return_mode="median"))
    _reset_grads(run)
    run.fn()  # warm-up: first-call costs (compilation, allocation) stay out of the timings
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        _reset_grads(run)
        start = time.perf_counter()
        run.fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(run: Runnable, device: torch.device) -> int | None:
    """Peak device memory one call allocates beyond what was live before it (None on CPU)."""
    if device.type != "cuda":
        return None  # torch keeps no allocator statistics for CPU tensors
    _reset_grads(run)
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run.fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    _reset_grads(run)
    return int(peak)


def python_unit(clock: Callable[[], float] = time.thread_time) -> float:
    """Seconds of `clock` for a fixed piece of plain Python (dict and list work, as a scheduler
    does): the yardstick the host figures are divided by, so that a slower or busier machine moves
    both alike. The sampler's host figure times it between decode steps in the same thread; the
    grader's, before and after grading."""
    start = clock()
    table: dict[int, int] = {}
    out: list[int] = []
    for i in range(4000):
        table[i & 255] = i
        out.append(table.get((i * 7) & 255, 0) + i)
    return clock() - start


# ---------------------------------------------------------------------------------------------
# The runner

OURS = "ours"


def _interpreter_failure(e: BaseException) -> bool:
    """Whether `e` comes from Triton's CPU interpreter running a kernel (not from our harness)."""
    from triton.runtime.errors import InterpreterError

    return isinstance(e, InterpreterError)


def _no_gpu_driver(e: BaseException) -> bool:
    """Whether `e` is Triton finding no GPU driver (its words: "0 active drivers")."""
    return isinstance(e, RuntimeError) and "0 active drivers" in str(e)


def run_sweep(
    bench: str,
    cases: Sequence[dict],
    modes: Sequence[str],
    providers: dict[str, Builder],
    work: Callable[[dict, str], Work],
    device: torch.device,
    ceilings: dict,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    log: Callable[[str], None] = print,
) -> list[Record]:
    records = []
    for case in cases:
        for mode in modes:
            w = work(case, mode)
            for name, build in providers.items():
                rec = Record(bench, dict(case), mode, name, work=asdict(w))
                runnable = None
                try:
                    runnable = build(case, mode, device)
                    rec.median_ms = time_ms(runnable, device, warmup_ms, rep_ms)
                    rec.peak_extra_bytes = peak_extra_bytes(runnable, device)
                except Unavailable as e:
                    rec.status = f"unavailable: {e}"
                except Exception as e:  # noqa: BLE001  (recorded, printed, and turned into the exit status)
                    if name != OURS and _interpreter_failure(e):
                        rec.status = f"unavailable: its Triton kernels fail in Triton's CPU interpreter ({type(e).__name__})"
                    elif name != OURS and _no_gpu_driver(e):
                        rec.status = "unavailable: its Triton kernels need a GPU driver (none here, and TRITON_INTERPRET is off)"
                    else:
                        rec.status = f"error: {type(e).__name__}: {e}".splitlines()[0][:300]
                        log(traceback.format_exc())
                finally:
                    runnable = None  # a failed provider's inputs must not sit under the next one's
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if rec.median_ms:
                    if w.bytes:
                        rec.gbps = w.bytes / rec.median_ms / 1e6
                    if w.flops:
                        rec.tflops = w.flops / rec.median_ms / 1e9
                    rate, ceiling = (rec.gbps, ceilings["copy_gbps"]) if w.bound == "memory" else (rec.tflops, ceilings["matmul_tflops"])
                    rec.fraction_of_ceiling = rate / ceiling if rate else None
                records.append(rec)
                log(format_row(rec))
    return records


# ---------------------------------------------------------------------------------------------
# Output


def _case_text(r: Record) -> str:
    return " ".join(f"{k}={v}" for k, v in r.case.items())


def format_row(r: Record, case_width: int = 44) -> str:
    head = f"{_case_text(r):<{case_width}} {r.mode:<8} {r.provider:<11}"
    if r.status != "ok":
        return f"{head} {r.status}"
    rate = f"{r.gbps:9.1f} GB/s" if r.work.get("bound") == "memory" else f"{r.tflops:9.1f} TF/s"
    frac = f"{100 * r.fraction_of_ceiling:5.1f}%" if r.fraction_of_ceiling is not None else "     -"
    mem = f"{r.peak_extra_bytes / 2**20:10.1f} MiB" if r.peak_extra_bytes is not None else "         - MiB"
    return f"{head} {r.median_ms:10.3f} ms {rate} {frac} {mem}"


def print_table(header: dict, records: Sequence[Record]) -> None:
    env, ceil = header["environment"], header["ceilings"]
    print(f"\n{header['bench']} / sweep {header['sweep']} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})")
    print(f"ceilings: copy {ceil['copy_gbps']:.1f} GB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s ({ceil['matmul_dtype']})")
    width = max([len(_case_text(r)) for r in records] + [4])
    print(f"{'case':<{width}} {'mode':<8} {'provider':<11} {'median':>13} {'rate':>14} {'%ceil':>6} {'peak extra':>14}")
    for r in records:
        print(format_row(r, width))


def write_json(path: Path, header: dict, records: Sequence[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**header, "records": [{**asdict(r), "key": r.key} for r in records]}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def finish(out: Path | None, header: dict, records: Sequence[Record], strict: bool = False) -> int:
    """Write the JSON if asked; the exit status: 1 when a provider failed (or, strict, did not run)."""
    if out:
        write_json(out, header, records)
        print(f"wrote {out}")
    failed = [r for r in records if r.status.startswith("error") or (strict and r.status != "ok")]
    return 1 if failed else 0


def add_common_args(parser: argparse.ArgumentParser, sweeps: dict, providers: Sequence[str], modes: Sequence[str]) -> None:
    parser.add_argument("--sweep", choices=sorted(sweeps), default="full", help="which named sweep to run (default: full)")
    parser.add_argument("--providers", default=",".join(providers), help=f"comma-separated subset of {','.join(providers)}")
    parser.add_argument("--modes", default=",".join(modes), help=f"comma-separated subset of {','.join(modes)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path (default: print only)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per measurement")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="timed repetitions per measurement, in ms")
    parser.add_argument("--strict", action="store_true", help="treat an unavailable provider as an error")


def main_for(
    bench: str, args: argparse.Namespace, sweeps: dict, builders: dict[str, Builder], all_modes: Sequence[str], work: Callable[[dict, str], Work]
) -> int:
    """Run `args.sweep` for the chosen providers and modes; print, write JSON; return the exit status."""
    chosen = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(chosen) - set(builders))
    modes = [m for m in args.modes.split(",") if m]
    bad_modes = sorted(set(modes) - set(all_modes))
    if unknown or bad_modes:
        raise SystemExit(refuse(f"unknown providers {unknown} (allowed: {sorted(builders)}) or modes {bad_modes} (allowed: {list(all_modes)})"))
    device = torch.device(args.device)
    header = {
        "schema": SCHEMA,
        "bench": bench,
        "sweep": args.sweep,
        "environment": environment(device),
        "ceilings": measure_ceilings(device),
    }
    records = run_sweep(
        bench, sweeps[args.sweep], modes, {p: builders[p] for p in chosen}, work, device, header["ceilings"], args.warmup_ms, args.rep_ms,
        log=lambda line: print(line, file=sys.stderr, flush=True),  # progress; the table goes to stdout at the end
    )
    print_table(header, records)
    return finish(args.out, header, records, strict=args.strict)


# ---------------------------------------------------------------------------------------------
# Which kernels the model runs on: ours (Triton), the torch references, or Liger-Kernel's swapped in.
# The same model runs on another implementation of RMSNorm and the fused cross-entropy without
# being touched: `kernels.set_backend` for ours and the references, kernels.dispatch's
# swapped_kernels for Liger's. Either way the engine's choice is restored on exit, errors included.

KERNELS = ("triton", "torch", "liger")


def liger_ops(device: torch.device):
    """Liger-Kernel's RMSNorm (Qwen2's "llama" casting) and fused linear cross-entropy (fp32
    weight-gradient accumulation, as ours), behind the signatures of kernels.rmsnorm and
    kernels.fused_linear_cross_entropy."""
    if device.type != "cuda":
        raise Unavailable("Liger's kernels run on CUDA only (they fail in Triton's CPU interpreter)")
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError as e:
        raise Unavailable(f"liger-kernel is not installed ({e})") from None

    def rmsnorm(x, weight, eps, residual=None):
        if residual is None:
            return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama")
        return LigerFusedAddRMSNormFunction.apply(x, residual, weight, eps, 0.0, "llama")  # (y, x + residual)

    def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="sum", z_loss=0.0):
        if z_loss:
            raise ValueError("the Liger swap implements z_loss=0 only")
        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
        #  reduction, softcap, return_z_loss, accum_dtype) -> (loss, ...)
        return LigerFusedLinearCrossEntropyFunction.apply(
            hidden, weight, targets, None, None, ignore_index, 0.0, 0.0, reduction, None, False, torch.float32
        )[0]

    return rmsnorm, fused_linear_cross_entropy


@contextlib.contextmanager
def kernel_choice(name: str, device: torch.device, liger=liger_ops):
    """Run the model on `name`'s RMSNorm and cross-entropy; the engine's choice is restored after."""
    if name not in KERNELS:
        raise ValueError(f"kernels={name!r}; allowed: {', '.join(KERNELS)}")
    if os.environ.get("KERNELS_BACKEND"):
        raise RuntimeError(f"KERNELS_BACKEND={os.environ['KERNELS_BACKEND']} is set and would override the kernels ablation: unset it")
    if name == "liger":
        rmsnorm, flce = liger(device)
        with swapped_kernels(rmsnorm=rmsnorm, fused_linear_cross_entropy=flce):
            yield
        return
    try:
        kernels.set_backend(name)
        if kernels.backend(device.type) != name:
            raise RuntimeError(f"asked for kernel backend {name!r} on {device.type}, got {kernels.backend(device.type)!r}")
        yield
    finally:
        kernels.set_backend("auto")


# ---------------------------------------------------------------------------------------------
# The LIMO run's layout


def rank_passes(lengths: list[int], *, samples_per_step: int, tokens_per_microbatch: int, epochs: int, world_size: int, seed: int):
    """Every step's micro-batches on every rank, as the engine's loader lays out samples of these
    token lengths: one list per step, of passes, of ranks, of the sample lengths in that
    micro-batch (empty: a rank's dummy pass, for ranks with fewer passes than the busiest)."""
    samples = [EncodedSample(torch.zeros(n, dtype=torch.int32), torch.ones(n, dtype=torch.int32), index=i) for i, n in enumerate(lengths)]
    loader = PackedLoader(samples, samples_per_step=samples_per_step, tokens_per_microbatch=tokens_per_microbatch, epochs=epochs,
                          world_size=world_size, rank=0, seed=seed)  # fmt: skip
    for batch in loader:
        layout = plan(batch.seqlens, world_size, tokens_per_microbatch, loader.cost)
        count = max(1, *(len(r) for r in layout))  # the loader pads every rank to this many passes
        yield [[[batch.seqlens[i] for i in r[p]] if p < len(r) else [] for r in layout] for p in range(count)]
