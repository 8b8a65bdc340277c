"""Which kernels the model runs on: ours (Triton), the torch references, or Liger-Kernel's swapped in.

Model code calls `kernels.rmsnorm` and `kernels.fused_linear_cross_entropy` by attribute at call
time, so a benchmark can run the same model on another implementation of the two ops without
touching the model: `kernels.set_backend` for ours and the references, a swap of the two
attributes for Liger's. Either way the engine's choice is restored on exit, errors included.
"""

from __future__ import annotations

import contextlib
import os

import torch

import kernels
from benchmarks.harness import Unavailable

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
        saved = kernels.rmsnorm, kernels.fused_linear_cross_entropy
        kernels.rmsnorm, kernels.fused_linear_cross_entropy = rmsnorm, flce  # model.py looks these up at call time
        try:
            yield
        finally:
            kernels.rmsnorm, kernels.fused_linear_cross_entropy = saved
        return
    try:
        kernels.set_backend(name)
        if kernels.backend(device.type) != name:
            raise RuntimeError(f"asked for kernel backend {name!r} on {device.type}, got {kernels.backend(device.type)!r}")
        yield
    finally:
        kernels.set_backend("auto")
