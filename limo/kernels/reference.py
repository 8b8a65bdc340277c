"""Pure-torch references for every kernel: the tests' ground truth and the CPU fallback.

They compute in float32 for half-precision inputs and in the input's own dtype otherwise, so a
float64 input gives a float64 reference. Semantics here define the contract the Triton kernels
must meet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = weight * (x / rms(x)); with `residual`, normalise s = x + residual and return (y, s).

    The sum is rounded to x's dtype before it is normalised, exactly as an unfused
    `h = x + r; rmsnorm(h)` would, so the fused and unfused forms agree.
    """
    if residual is not None:
        x = x + residual
    h = x.to(_compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if residual is None else (y, x)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "sum",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, materialising the logits.

    Per token: lse - logit[target] (+ z_loss * lse**2); ignored tokens contribute 0.
    "mean" divides by the number of supervised tokens (at least 1, so an all-ignored
    batch gives 0, not NaN).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    dtype = _compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T  # [T, V]
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = lse - logits.gather(1, safe[:, None]).squeeze(1)
    if z_loss:
        loss = loss + z_loss * lse.square()
    total = torch.where(keep, loss, 0.0).sum()
    if reduction == "mean":
        total = total / keep.sum().clamp(min=1)
    return total


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal attention within each packed sample; q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    One scaled-dot-product call per sample, never a block-diagonal mask over the whole stream.
    Each call gets 4-D [1, H, L, D] inputs: that is what lets PyTorch's CPU flash kernel take it
    (3-D inputs fall back to the math path, which keeps H x L x L scores for backward: 4 GiB per
    head at 16k tokens). Every dtype then costs O(L) memory beyond q, k, v and the output.
    """
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()  # a host sync: free on CPU; on CUDA only fp32/fp64 exactness runs come here (logged)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


def varlen_attention_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Segment i's queries against its own keys, of which they are the last (bottom-right causal:
    query j of Lq sees keys 0 .. Lk - Lq + j). Differentiated by autograd through SDPA."""
    outs = []
    for qa, qb, ka, kb in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        Lq, Lk = qb - qa, kb - ka
        if Lq == 0:
            continue
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)
        qs, ks, vs = q[qa:qb].transpose(0, 1)[None], k[ka:kb].transpose(0, 1)[None], v[ka:kb].transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)


def varlen_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of varlen_attention's q, k, v for the output gradient `grad` [T, Hq, D].

    Recomputes each sample's attention and takes its vector-Jacobian product with torch.func.vjp,
    which works inside a torch.library op's implementation (autograd does not record there): the
    same SDPA kernels and gradients as differentiating varlen_attention itself, one sample's
    saved state alive at a time (O(L) on the CPU flash kernel), for one extra forward.
    """
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def sample(qs, ks, vs):
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)

    bounds = cu_seqlens.tolist()  # a host sync, like the forward's
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        inputs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, L, D]
        _, vjp = torch.func.vjp(sample, *inputs)
        grads = vjp(grad[start:end].transpose(0, 1)[None])
        for out, g in zip((dq, dk, dv), grads):
            out[start:end] = g[0].transpose(0, 1)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Paged KV cache (the sampler: limo/kernels/paged_attention.py). Layout of one layer's cache:
# [num_blocks, block_size, Hkv, D]; token i of a sequence sits at flat slot
# block_table[i // block_size] * block_size + i % block_size.


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] into the caches at flat slots [T]; a negative slot skips its token."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()  # boolean indexing syncs: this reference runs on CPU
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense softmax attention of q [B, Hq, D] over each sequence's first context_lens[b] cached tokens.

    Gathers every page of the block table into a dense [B, pages * block_size, Hkv, D] copy: the
    tests' ground truth (the CPU path, kernels.paged_attention.paged_attention_torch, does the same
    a cache-sized group of sequences at a time). Positions past a context are zeroed in the copy and masked, whatever
    they held (an uninitialised cache, NaN included: a NaN score survives an additive mask, and
    0 * NaN would reach the output). An empty context gives zeros. Returns q's dtype.
    """
    B, Hq, D = q.shape
    dtype = _compute_dtype(q.dtype)
    pages = block_tables.long()
    live = torch.arange(pages.shape[1] * k_cache.shape[1], device=q.device)[None, :] < context_lens[:, None]  # [B, N]
    dead = ~live[:, :, None, None]
    k, v = (c[pages].flatten(1, 2).to(dtype).masked_fill_(dead, 0.0) for c in (k_cache, v_cache))  # [B, N, Hkv, D]: gathered
    # One SDPA call on strided [B, H, N, D] views: PyTorch's CPU flash kernel reads K and V once.
    out = F.scaled_dot_product_attention(q.to(dtype)[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=live[:, None, None, :], scale=scale, enable_gqa=True)[:, :, 0]  # [B, Hq, D]
    return torch.where(live.any(-1)[:, None, None], out, 0.0).to(q.dtype)
