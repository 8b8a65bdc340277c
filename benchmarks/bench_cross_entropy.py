"""Fused linear cross-entropy: ours vs torch eager vs torch.compile vs Liger, at Qwen2.5-32B's head.

    python -m benchmarks.bench_cross_entropy                    # the full sweep on the GPU
    python -m benchmarks.bench_cross_entropy --providers ours,liger,liger-fp32 --out ce.json
    TRITON_INTERPRET=1 python -m benchmarks.bench_cross_entropy --sweep smoke --providers ours,eager

Matmul-bound, so judged in TFLOP/s against the measured bf16 matmul rate: the forward is one
T x H x V product (2THV FLOPs), forward+backward three (6THV). Peak memory is what one call
adds beyond its inputs, gradients included: where the memory goes is half of what this op is for.
Providers: `eager` materialises the logits (bf16, then fp32 inside cross_entropy); `liger` is
Liger-Kernel's default (weight gradient summed in the weight's dtype), `liger-fp32` its
accum_dtype=float32 (summed in fp32, as ours is).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import Runnable, Unavailable, Work, add_common_args, main_for
from limo.tools.dtypes import dtype_of

MODES = ("fwd", "fwd+bwd")
SWEEPS = {
    "full": [dict(tokens=t, hidden=5120, vocab=152064, dtype="bf16") for t in (4096, 8192, 16384)],
    "quick": [dict(tokens=8192, hidden=5120, vocab=152064, dtype="bf16")],  # gpu_suite.sh quick: Qwen2.5-32B's head
    "smoke": [dict(tokens=64, hidden=32, vocab=203, dtype="fp32")],
}


def work(case: dict, mode: str) -> Work:
    flops = 2 * case["tokens"] * case["hidden"] * case["vocab"]
    return Work(flops=flops * (3 if mode == "fwd+bwd" else 1), bound="compute")


def _runnable(loss_fn, case: dict, mode: str, device: torch.device) -> Runnable:
    """loss_fn(hidden, weight, targets) -> summed loss; timed alone ("fwd", no grad) or with backward."""
    dtype = dtype_of(case["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    T, H, V = case["tokens"], case["hidden"], case["vocab"]
    grad = mode == "fwd+bwd"
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g).requires_grad_(grad)
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=g) / H**0.5).requires_grad_(grad)
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    targets[: T // 8] = -100  # a prompt's worth of unsupervised tokens, as in SFT data
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return loss_fn(hidden, weight, targets)
        return Runnable(fn)
    return Runnable(lambda: loss_fn(hidden, weight, targets).backward(), grads=(hidden, weight))


def ours(case, mode, device):
    from limo.kernels.cross_entropy import fused_linear_cross_entropy

    return _runnable(lambda h, w, t: fused_linear_cross_entropy(h, w, t, reduction="sum"), case, mode, device)


def _torch_loss(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t, reduction="sum")


def eager(case, mode, device):
    return _runnable(_torch_loss, case, mode, device)


def compiled(case, mode, device):
    torch._dynamo.reset()  # a fresh, shape-specialised compile per case (dynamo's recompile limit would otherwise fall back to eager)
    return _runnable(torch.compile(_torch_loss, dynamic=False), case, mode, device)


def _liger(accum_dtype):
    def build(case, mode, device):
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        except ImportError as e:
            raise Unavailable(f"liger-kernel is not installed ({e})") from None

        def loss(h, w, t):
            # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
            #  reduction, softcap, return_z_loss, accum_dtype) -> (loss, ...)
            return LigerFusedLinearCrossEntropyFunction.apply(h, w, t, None, None, -100, 0.0, 0.0, "sum", None, False, accum_dtype)[0]

        return _runnable(loss, case, mode, device)

    return build


PROVIDERS = {"ours": ours, "eager": eager, "compile": compiled, "liger": _liger(None), "liger-fp32": _liger(torch.float32)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_cross_entropy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, SWEEPS, list(PROVIDERS), MODES)
    return main_for("fused_linear_cross_entropy", parser.parse_args(argv), SWEEPS, PROVIDERS, MODES, work)


if __name__ == "__main__":
    sys.exit(main())
