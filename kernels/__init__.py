"""The engine's kernels: the only functions model code calls for these ops.

    rmsnorm(x, weight, eps, residual=None)
    fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="sum", z_loss=0.0)
    varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None)

rmsnorm and fused_linear_cross_entropy run our Triton kernels (kernels/rmsnorm.py,
kernels/cross_entropy.py) or, on the "torch" backend, torch code of the same memory shape: the
RMSNorm reference (kernels/reference.py) and the cross-entropy's chunks in torch ops (its float64
reference, which builds [T, V] logits, is the tests' ground truth only). The backend is chosen
once: `set_backend("auto" | "triton" | "torch")` (the training loop passes `train.kernels`), and
the environment variable KERNELS_BACKEND, when set, overrides that choice. "auto" means Triton
for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 (Triton's CPU interpreter, which
must be chosen before this package is imported); the torch reference otherwise. A backend that
is named and cannot run raises; nothing falls back silently. Each device type's choice is logged
once. varlen_attention has its own dispatch (kernels/attention.py).
"""

from __future__ import annotations

import logging
import os

import torch

# Bind the Triton modules before the functions of the same name below replace the package
# attributes `kernels.rmsnorm` (import the module's contents with `from kernels.rmsnorm import ...`).
from kernels import cross_entropy as _cross_entropy
from kernels import reference
from kernels import rmsnorm as _rmsnorm
from kernels.attention import varlen_attention
from kernels.triton_common import interpreting

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
_setting: dict[str, str] = {}  # "requested" and its "source", set once by set_backend (or by first use)
_resolved: dict[str, str] = {}  # device type -> "triton" | "torch", decided on first use and logged


def _triton_unavailable(device_type: str) -> str | None:
    """None when the Triton kernels can run on tensors of `device_type`, else why not."""
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if interpreting():
            return None
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before `kernels` is imported"
    return f"no Triton path for {device_type} tensors"


def set_backend(name: str = "auto") -> str:
    """Choose the kernel backend once; KERNELS_BACKEND overrides `name`.

    Returns the backend of the default device (CUDA when present, else CPU), so a named
    backend that cannot run raises here, at start-up, rather than at the first kernel call.
    """
    env = os.environ.get("KERNELS_BACKEND")
    requested, source = (env, "KERNELS_BACKEND") if env else (name, "set_backend")
    if requested not in BACKENDS:
        raise ValueError(f"{source}={requested!r} is not a kernel backend; allowed: {', '.join(BACKENDS)}")
    _setting.update(requested=requested, source=source)
    _resolved.clear()
    return backend()


def backend(device_type: str | None = None) -> str:
    """The backend ("triton" or "torch") for tensors of `device_type` (default: CUDA if present, else CPU)."""
    if not _setting:
        set_backend("auto")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in _resolved:
        requested, source = _setting["requested"], _setting["source"]
        reason = _triton_unavailable(device_type)
        if requested == "triton" and reason:
            raise RuntimeError(f"kernel backend 'triton' (from {source}) cannot run on {device_type}: {reason}")
        _resolved[device_type] = requested if requested != "auto" else ("torch" if reason else "triton")
        why = f"; Triton unavailable: {reason}" if requested == "auto" and reason else ""
        log.info("kernels on %s: %s (%s=%s%s)", device_type, _resolved[device_type], source, requested, why)
    return _resolved[device_type]


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = weight * (x / rms(x)); with `residual`, normalise s = x + residual and return (y, s)."""
    if backend(x.device.type) == "triton":
        return _rmsnorm.rmsnorm(x, weight, eps, residual=residual)
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
    (the torch one runs the same chunks in torch ops: kernels/cross_entropy.py)."""
    chosen = backend(hidden.device.type)
    return _cross_entropy.fused_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, z_loss, backend=chosen)


__all__ = ["rmsnorm", "fused_linear_cross_entropy", "varlen_attention", "set_backend", "backend", "BACKENDS"]
