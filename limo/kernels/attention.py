"""Causal varlen attention over packed streams, with grouped-query attention.

Three implementations, chosen by limo/kernels/dispatch.py (`attention_backend`, once per device type
and dtype, logged; ATTENTION_BACKEND names one):
  flash        `flash_attn.flash_attn_varlen_func` (the flash-attn package, CUDA)
  torch_varlen `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, CUDA)
  reference    one `scaled_dot_product_attention` per sample (any device; the CPU path), as the
               op `limo::varlen_attention_reference`
The fused kernels take fp16/bf16 only, so float32 and float64 inputs (exactness tests) go to the
reference. All three are torch.library ops with fake implementations (flash-attn's and torch's
ship theirs), so torch.compile traces through each and FakeTensorMode runs each on fake tensors.

The reference reads the sample bounds on the host. Real tensors in eager mode call it directly
(SDPA's own backward, which profilers and dispatch modes see op by op); fake tensors, meta tensors
and torch.compile traces reach it through the op, whose fake implementation needs no bounds and
whose backward, an op too, recomputes each sample's attention and differentiates it
(limo/kernels/reference.py): it saves only q, k, v, never an L x L score.
"""

from __future__ import annotations

import inspect

import torch

from limo.kernels import reference
from limo.kernels.dispatch import attention_backend, constant_to_compile, path_of, shapes_only


_VARLEN_PARAMS: dict[str, bool] = {}


@constant_to_compile
def _varlen_takes(param: str) -> bool:
    """Whether this torch's varlen_attn takes `param`: PyTorch 2.10 spells causality `is_causal`,
    2.11+ a (left, right) `window_size`; `enable_gqa` where it exists (else K/V are repeated per
    group). Read at the first call, as torch.nn.attention.varlen imports torch._dynamo (~2 s of a
    process's start-up that one without a GPU skips), and a constant to torch.compile, which calls
    it instead of tracing `inspect`."""
    if param not in _VARLEN_PARAMS:
        from torch.nn.attention.varlen import varlen_attn

        _VARLEN_PARAMS[param] = param in inspect.signature(varlen_attn).parameters
    return _VARLEN_PARAMS[param]


@torch.library.custom_op("limo::varlen_attention_reference", mutates_args=())
def _reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None) -> torch.Tensor:
    return reference.varlen_attention(q, k, v, cu_seqlens, scale)


@_reference_op.register_fake
def _reference_fake(q, k, v, cu_seqlens, scale):
    return torch.empty_like(q)


@torch.library.custom_op("limo::varlen_attention_reference_backward", mutates_args=())
def _reference_backward_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference.varlen_attention_backward(grad, q, k, v, cu_seqlens, scale)


@_reference_backward_op.register_fake
def _reference_backward_fake(grad, q, k, v, cu_seqlens, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _reference_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.scale = scale


def _reference_backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    return (*_reference_backward_op(grad, q, k, v, cu_seqlens, ctx.scale), None, None)


_reference_op.register_autograd(_reference_backward, setup_context=_reference_setup)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Causal attention that never crosses a sample boundary.

    q [T, Hq, D], k and v [T, Hkv, D] with Hq a multiple of Hkv; cu_seqlens int32 [n+1]
    (0, end of sample 0, ..., T); max_seqlen is the longest sample (a host int, so no kernel
    needs a device sync to size its grid). Returns [T, Hq, D].

    With `cu_seqlens_k` (context parallelism, limo/engine/context.py), segment i's queries
    q[cu_seqlens[i]:cu_seqlens[i+1]] attend to its own keys k[cu_seqlens_k[i]:cu_seqlens_k[i+1]],
    of which they are the last ones (bottom-right causal, flash-attn's convention for Lq <= Lk):
    a chunk of a document against the document's prefix up to the chunk's end.
    """
    if cu_seqlens_k is not None:
        return _varlen_attention_qk(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k or max_seqlen, scale)
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree in T or D, or Hq is not a multiple of Hkv")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D int32, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    backend = attention_backend(path_of(q)[0], q.dtype)
    if backend != "reference":
        return _fast_varlen(backend, q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale)
    if shapes_only(q):
        return _reference_op(q, k, v, cu_seqlens, scale)
    return reference.varlen_attention(q, k, v, cu_seqlens, scale)


def _fast_varlen(backend: str, q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """flash-attn's or torch's varlen kernel: causal, bottom-right aligned where a segment's
    queries are fewer than its keys (the same as top-left where they are as many)."""
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)
    from torch.nn.attention.varlen import varlen_attn

    kwargs = {"window_size": (-1, 0)} if _varlen_takes("window_size") else {"is_causal": True}
    if _varlen_takes("enable_gqa"):
        kwargs["enable_gqa"] = True
    else:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **kwargs)


def _varlen_attention_qk(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected q [Tq, Hq, D] and k, v [Tk, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_q.shape != cu_k.shape or cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32:
        raise ValueError(f"cu_seqlens {tuple(cu_q.shape)} {cu_q.dtype} and cu_seqlens_k {tuple(cu_k.shape)} {cu_k.dtype}: one int32 bound per segment each")
    backend = attention_backend(path_of(q)[0], q.dtype)
    if backend != "reference":
        return _fast_varlen(backend, q, k, v, cu_q, cu_k, max_q, max_k, scale)
    if shapes_only(q):
        raise NotImplementedError("context-parallel attention on the reference path runs eagerly on real tensors only "
                                  "(no torch.compile, no fake tensors): use flash-attn or torch varlen on CUDA")  # fmt: skip
    return reference.varlen_attention_qk(q, k, v, cu_q, cu_k, scale)
