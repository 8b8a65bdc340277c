"""The engine's kernels: the only functions model code calls for these ops.

    rmsnorm(x, weight, eps, residual=None)
    fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="sum", z_loss=0.0)
    varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None)

rmsnorm and fused_linear_cross_entropy run our Triton kernels (limo/kernels/norm.py,
limo/kernels/cross_entropy.py), as torch.library ops that torch.compile traces through and
FakeTensorMode runs, or, on the "torch" backend, torch code of the same memory shape: the
RMSNorm reference (limo/kernels/reference.py) and the cross-entropy's chunks in torch ops (its float64
reference, which builds [T, V] logits, is the tests' ground truth only). varlen_attention runs
flash-attn, torch's varlen attention or the per-sample reference (limo/kernels/attention.py).
limo/kernels/dispatch.py makes every one of these choices, once: `set_backend("auto" | "triton" |
"torch")` (the training loop passes `train.kernels`), KERNELS_BACKEND and ATTENTION_BACKEND.
`python -m limo.kernels.compile_check` compiles every kernel for Hopper and Ampere without a GPU.
"""

from __future__ import annotations

import torch

from limo.kernels import cross_entropy as _cross_entropy
from limo.kernels import norm as _norm
from limo.kernels import reference
from limo.kernels.attention import varlen_attention
from limo.kernels.dispatch import BACKENDS, backend, kernel_backend, set_backend, swapped


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = weight * (x / rms(x)); with `residual`, normalise s = x + residual and return (y, s)."""
    if (other := swapped("rmsnorm")) is not None:
        return other(x, weight, eps, residual=residual)
    if kernel_backend(x) == "triton":
        return _norm.rmsnorm(x, weight, eps, residual=residual)
    return reference.rmsnorm(x, weight, eps, residual=residual)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "sum",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` without [T, V] logits, on either backend
    (the torch one runs the same chunks in torch ops: limo/kernels/cross_entropy.py)."""
    if (other := swapped("fused_linear_cross_entropy")) is not None:
        return other(hidden, weight, targets, ignore_index, reduction, z_loss)
    chosen = kernel_backend(hidden)
    return _cross_entropy.fused_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, z_loss, backend=chosen)


__all__ = ["rmsnorm", "fused_linear_cross_entropy", "varlen_attention", "set_backend", "backend", "BACKENDS"]
