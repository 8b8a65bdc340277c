"""RMSNorm: ours (Triton) vs torch eager vs torch.compile vs Liger, forward and forward+backward.

    python -m benchmarks.bench_rmsnorm                          # the full sweep on the GPU
    python -m benchmarks.bench_rmsnorm --sweep residual --out benchmarks/results/rmsnorm-h100.json
    TRITON_INTERPRET=1 python -m benchmarks.bench_rmsnorm --sweep smoke --providers ours,eager

Memory-bound, so judged in GB/s against the measured copy bandwidth. Bytes counted are the
fewest any implementation must move: forward reads x (and the residual) and writes y (and the
sum); backward reads dy and the saved input and writes dx; plus the weight, its gradient and one
fp32 statistic per row.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.harness import Runnable, Unavailable, Work, add_common_args, main_for
from limo.tools.dtypes import dtype_of

MODES = ("fwd", "fwd+bwd")
SWEEPS = {
    "full": [dict(rows=r, width=w, dtype="bf16", residual=False) for r in (16384, 32768, 65536) for w in (4096, 5120, 8192)],
    "residual": [dict(rows=r, width=w, dtype="bf16", residual=True) for r in (16384, 32768, 65536) for w in (4096, 5120, 8192)],
    "quick": [dict(rows=16384, width=5120, dtype="bf16", residual=False)],  # gpu_suite.sh quick: a 16k micro-batch at 32B's width
    "smoke": [dict(rows=64, width=256, dtype="fp32", residual=False), dict(rows=37, width=1003, dtype="fp32", residual=True)],
}
EPS = 1e-6


def work(case: dict, mode: str) -> Work:
    e = torch.empty((), dtype=dtype_of(case["dtype"])).element_size()
    m, n = case["rows"], case["width"]
    streams = 4 if case["residual"] else 2  # x (+ r) read, y (+ s) written
    fwd = streams * m * n * e + n * e + 4 * m
    bwd = 3 * m * n * e + 2 * n * e + 4 * m  # dy, s read; dx written; w read, dw written; rstd read
    return Work(bytes=fwd + (bwd if mode == "fwd+bwd" else 0), bound="memory")


def _inputs(case: dict, mode: str, device: torch.device):
    dtype = dtype_of(case["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    shape = (case["rows"], case["width"])
    grad = mode == "fwd+bwd"
    x = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_(grad)
    r = torch.randn(shape, device=device, dtype=dtype, generator=g) if case["residual"] else None
    w = (torch.rand(case["width"], device=device, dtype=dtype, generator=g) + 0.5).requires_grad_(grad)
    dy = torch.randn(shape, device=device, dtype=dtype, generator=g)
    return x, r, w, dy


def _runnable(norm, case: dict, mode: str, device: torch.device) -> Runnable:
    """norm(x, w, residual) -> y or (y, s); timed alone ("fwd") or with y's backward ("fwd+bwd")."""
    x, r, w, dy = _inputs(case, mode, device)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return norm(x, w, r)
        return Runnable(fn)
    return Runnable(lambda: first(norm(x, w, r)).backward(dy), grads=(x, w))


def ours(case, mode, device):
    from limo.kernels.norm import rmsnorm

    return _runnable(lambda x, w, r: rmsnorm(x, w, EPS, residual=r), case, mode, device)


def eager(case, mode, device):
    from limo.kernels.reference import rmsnorm

    return _runnable(lambda x, w, r: rmsnorm(x, w, EPS, residual=r), case, mode, device)


def compiled(case, mode, device):
    from limo.kernels.reference import rmsnorm

    torch._dynamo.reset()  # a fresh, shape-specialised compile per case (dynamo's recompile limit would otherwise fall back to eager)
    fn = torch.compile(rmsnorm, dynamic=False)
    return _runnable(lambda x, w, r: fn(x, w, EPS, residual=r), case, mode, device)


def liger(case, mode, device):
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError as e:
        raise Unavailable(f"liger-kernel is not installed ({e})") from None

    def norm(x, w, r):
        # casting_mode="llama" is Qwen2's: x_hat cast to the input dtype before the weight multiply.
        # in_place=False: Liger's default writes dx over the incoming dy, which here is the bench's
        # one dy reused every repetition (it would drift) and would hide the dx allocation that
        # every other provider pays for.
        if r is None:
            return LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
        return LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama")

    return _runnable(norm, case, mode, device)


PROVIDERS = {"ours": ours, "eager": eager, "compile": compiled, "liger": liger}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rmsnorm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, SWEEPS, list(PROVIDERS), MODES)
    return main_for("rmsnorm", parser.parse_args(argv), SWEEPS, PROVIDERS, MODES, work)


if __name__ == "__main__":
    sys.exit(main())
