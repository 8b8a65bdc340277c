"""The engine's kernels: the only functions model code calls for these ops.

    rmsnorm(x, weight, eps, residual=None)
    fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="sum", z_loss=0.0)
    varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None)
"""

from kernels.attention import varlen_attention
from kernels.reference import fused_linear_cross_entropy, rmsnorm

__all__ = ["rmsnorm", "fused_linear_cross_entropy", "varlen_attention"]
