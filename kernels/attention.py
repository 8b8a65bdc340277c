"""Causal varlen attention over packed streams, with grouped-query attention.

Backends, in order of preference (decided once per device type and dtype, and logged):
  flash        `flash_attn.flash_attn_varlen_func` (the flash-attn package, CUDA)
  torch_varlen `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, CUDA)
  reference    one `scaled_dot_product_attention` per sample (any device; the CPU path)
`ATTENTION_BACKEND=flash|torch_varlen|reference` names one explicitly; a named backend that
cannot run raises instead of falling back. The fused kernels take fp16/bf16 only, so float32
and float64 inputs (exactness tests) go to the reference; the choice is made per device type
and dtype, and logged.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os

import torch

from kernels import reference

log = logging.getLogger(__name__)

BACKENDS = ("flash", "torch_varlen", "reference")


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _available(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when `name` can run on `device` with `dtype` inputs, else the reason it cannot."""
    if name == "reference":
        return None
    if device.type != "cuda":
        return f"{name} needs a CUDA device, got {device.type}"
    if dtype not in HALF_DTYPES:
        return f"{name} needs float16 or bfloat16 inputs, got {dtype}"
    if name == "flash" and importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install -e '.[flash]')"
    if name == "torch_varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)"
    return None


@functools.cache
def select_backend(device_type: str, dtype: torch.dtype = torch.bfloat16) -> str:
    device = torch.device(device_type)
    named = os.environ.get("ATTENTION_BACKEND")
    if named:
        if named not in BACKENDS:
            raise ValueError(f"ATTENTION_BACKEND={named!r}; allowed: {', '.join(BACKENDS)}")
        reason = _available(named, device, dtype)
        if reason:
            raise RuntimeError(f"ATTENTION_BACKEND={named} cannot run: {reason}")
        choice = named
    else:
        choice = next(b for b in BACKENDS if _available(b, device, dtype) is None)
    log.info("varlen attention on %s for %s: %s", device_type, dtype, choice)
    return choice


@functools.cache
def _torch_varlen():
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    # PyTorch 2.10 spells causality `is_causal`; 2.11+ spells it as a (left, right) window.
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention that never crosses a sample boundary.

    q [T, Hq, D], k and v [T, Hkv, D] with Hq a multiple of Hkv; cu_seqlens int32 [n+1]
    (0, end of sample 0, ..., T); max_seqlen is the longest sample (a host int, so no kernel
    needs a device sync to size its grid). Returns [T, Hq, D].
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree in T or D, or Hq is not a multiple of Hkv")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D int32, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    backend = select_backend(q.device.type, q.dtype)
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    if backend == "torch_varlen":
        varlen_attn, causal, has_gqa = _torch_varlen()
        if has_gqa:
            causal = {**causal, "enable_gqa": True}
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, **causal)
    return reference.varlen_attention(q, k, v, cu_seqlens, scale)
