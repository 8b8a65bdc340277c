"""The one place that decides which implementation runs each kernel.

Two choices, each made once per process (per device type, and per dtype for attention) and logged:

  kernel backend  "triton": our Triton kernels, reached as torch.library ops (RMSNorm, the fused
                  cross-entropy, the paged KV store and decode attention); "torch": the references
                  of limo/kernels/reference.py and the cross-entropy's torch twin. `set_backend("auto" |
                  "triton" | "torch")` (the training loop passes `train.kernels`); KERNELS_BACKEND,
                  when set, overrides it. "auto" means Triton for CUDA tensors, and for CPU tensors
                  when TRITON_INTERPRET=1 (Triton's CPU interpreter, chosen before `kernels` is
                  imported); the torch references otherwise.
  attention       "flash" (flash-attn), "torch_varlen" (torch.nn.attention.varlen, PyTorch >= 2.10)
                  or "reference" (one SDPA call per sample), in that order of preference; the fused
                  ones need CUDA and fp16/bf16. ATTENTION_BACKEND names one.

A named backend that cannot run raises; nothing falls back silently. A benchmark that compares
with another library's kernels (Liger-Kernel's) swaps them in for a block, `swapped_kernels`,
behind the same signatures: the model code and the engine's own choice stay as they are.

Fake tensors (FakeTensorMode) take the path their device names: a fake CUDA tensor gets exactly
the ops an H100 would run (Triton ops, flash/torch varlen attention), on a machine without a
GPU, and none of them executes; their fake implementations give the output shapes. A real CUDA
tensor cannot exist without CUDA, so this does not let a named backend run where it cannot.
While torch.compile traces, every tensor is fake. The choice is a constant to torch.compile
(`assume_constant_result`): traced code keeps the backend it was traced with.

A torch built without CUDA (the CPU wheel CI installs) cannot index fake CUDA tensors or
differentiate through them: both ask for a CUDA device guard that only a CUDA build registers.
There, `as_device("cuda")` makes tensors without values (meta tensors, and fake tensors of any
device) take the CUDA path instead: the same ops, traced on a device every build has. The full
model's simulated training step (limo/engine/simulate.py) runs on fake CPU tensors this way, because
FSDP2 refuses meta parameters.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake

from limo.kernels.triton_common import interpreting

_R = TypeVar("_R")

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
ATTENTION_BACKENDS = ("flash", "torch_varlen", "reference")
HALF_DTYPES = (torch.float16, torch.bfloat16)

_setting: dict[str, str] = {}  # "requested" and its "source", set once by set_backend (or by first use)
_resolved: dict[tuple[str, bool], str] = {}  # (device type, fake) -> "triton" | "torch", decided on first use and logged
_attention: dict[tuple[str, torch.dtype], str] = {}  # (device type, dtype) -> attention backend


_swapped: dict[str, Callable] = {}  # op -> another library's implementation, inside swapped_kernels
SWAPPABLE = ("rmsnorm", "fused_linear_cross_entropy")

_as_device: list[str] = []  # the device type value-less tensors stand for, innermost as_device last


@contextlib.contextmanager
def swapped_kernels(**impls: Callable) -> Iterator[None]:
    """Inside this block, `kernels.rmsnorm` and `kernels.fused_linear_cross_entropy` run the given
    implementations (same signatures) instead of the backend's; on exit, errors included, the
    engine's own are back. Does not nest."""
    unknown = sorted(set(impls) - set(SWAPPABLE))
    if unknown:
        raise ValueError(f"swapped_kernels: no op {unknown}; swappable: {', '.join(SWAPPABLE)}")
    if _swapped:
        raise RuntimeError(f"swapped_kernels: {', '.join(_swapped)} already swapped (the block does not nest)")
    _swapped.update(impls)
    try:
        yield
    finally:
        _swapped.clear()


def constant_to_compile(fn: Callable[..., _R]) -> Callable[..., _R]:
    """`torch.compiler.assume_constant_result`, without importing torch._dynamo (about 2 s of a
    process's start-up; the sampler, the data tools and the simulation never compile). torch's
    decorator only sets the attribute Dynamo reads; tests/test_kernels_backend.py checks that it still
    does, so a torch that changes the marker fails there, not silently in a compiled model."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def swapped(op: str) -> Callable | None:
    """The implementation swapped in for `op` (see swapped_kernels), or None."""
    return _swapped.get(op)


def fake_or_traced(t: torch.Tensor) -> bool:
    """True for a fake tensor (FakeTensorMode), and for every tensor while torch.compile traces."""
    return torch.compiler.is_compiling() or is_fake(t)


def shapes_only(t: torch.Tensor) -> bool:
    """True when `t` has no values to read: fake, traced by torch.compile, or on the meta device."""
    return t.device.type == "meta" or fake_or_traced(t)


@contextlib.contextmanager
def as_device(device_type: str) -> Iterator[None]:
    """Inside this block, tensors that hold no values (meta, or fake on any device) take
    `device_type`'s path: its kernel and attention backends. Real tensors keep their own."""
    _as_device.append(device_type)
    try:
        yield
    finally:
        _as_device.pop()


def path_of(t: torch.Tensor) -> tuple[str, bool]:
    """(device type whose path `t` takes, whether `t` only has a shape): its own device, or for a
    value-less tensor inside as_device(...), the device it stands for."""
    if _as_device and (t.device.type == "meta" or is_fake(t)):
        return _as_device[-1], True
    return t.device.type, fake_or_traced(t)


def _triton_unavailable(device_type: str, fake: bool = False) -> str | None:
    """None when the Triton kernels can run on (or, for fake tensors, be traced for) `device_type`, else why not."""
    if device_type == "cuda":
        return None if fake or torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if interpreting():
            return None
        return "CPU tensors run Triton kernels only in Triton's interpreter (TRITON_INTERPRET=1 before limo.kernels is imported; for checking numerics)"
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


@constant_to_compile
def backend(device_type: str | None = None, fake: bool = False) -> str:
    """The kernel backend ("triton" or "torch") for tensors of `device_type` (default: CUDA if
    present, else CPU); `fake` for fake tensors, which take the path of their device."""
    if not _setting:
        set_backend("auto")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (device_type, fake)
    if key not in _resolved:
        requested, source = _setting["requested"], _setting["source"]
        reason = _triton_unavailable(device_type, fake)
        if requested == "triton" and reason:
            raise RuntimeError(f"kernel backend 'triton' (from {source}) cannot run on {device_type}: {reason}")
        _resolved[key] = requested if requested != "auto" else ("torch" if reason else "triton")
        why = f" picks the torch references here, as intended: {reason}" if requested == "auto" and reason else ""
        of = f"{device_type} (fake tensors, traced)" if fake else device_type
        log.info("kernels on %s: %s (%s=%s%s)", of, _resolved[key], source, requested, why)
    return _resolved[key]


def kernel_backend(t: torch.Tensor) -> str:
    """The kernel backend for this tensor: its device's, fake tensors included (see path_of)."""
    return backend(*path_of(t))


def attention_unavailable(name: str, device_type: str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when attention backend `name` can run on `device_type` with `dtype` inputs, else why not.

    Only the device type is asked, never the device: a fake CUDA tensor qualifies as a real one.
    """
    if name == "reference":
        return None
    if device_type != "cuda":
        return f"{name} needs a CUDA device, got {device_type}"
    if dtype not in HALF_DTYPES:
        return f"{name} needs float16 or bfloat16 inputs, got {dtype}"
    if name == "flash" and importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install -e '.[flash]')"
    if name == "torch_varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)"
    return None


@constant_to_compile
def attention_backend(device_type: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """The varlen attention backend for `device_type` and `dtype`: ATTENTION_BACKEND, else the first that can run."""
    key = (device_type, dtype)
    if key not in _attention:
        named = os.environ.get("ATTENTION_BACKEND")
        if named:
            if named not in ATTENTION_BACKENDS:
                raise ValueError(f"ATTENTION_BACKEND={named!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
            reason = attention_unavailable(named, device_type, dtype)
            if reason:
                raise RuntimeError(f"ATTENTION_BACKEND={named} cannot run: {reason}")
            _attention[key] = named
        else:
            _attention[key] = next(b for b in ATTENTION_BACKENDS if attention_unavailable(b, device_type, dtype) is None)
        log.info("varlen attention on %s for %s: %s", device_type, dtype, _attention[key])
    return _attention[key]
