"""RMSNorm with an optional fused residual add, in Triton.

Forward, per row of width N:  s = x + r (rounded to x's dtype, as an unfused add would be),
rstd = 1 / sqrt(mean(s^2) + eps) in fp32, y = w * (s * rstd cast to x's dtype). The cast before
the weight multiply is transformers' Qwen2RMSNorm (and limo/kernels/reference.py), so this kernel and
the HF model agree to rounding. y takes the promoted dtype of x and w, as in torch.

The op is memory-bound: forward reads x (and r) once and writes y (and s); backward reads dy
(and ds), s and rstd once and writes dx. Statistics are fp32 (fp64 for fp64 inputs, so float64
tests check the algebra exactly). dw is summed first in registers of each program and then
across programs in fp32, never in a half dtype.

Layout (STYLE.md): @triton.jit kernels -> host functions `rmsnorm_fwd` / `rmsnorm_bwd` that check
the contract and launch -> the torch.library ops `limo::rmsnorm`, `limo::rmsnorm_residual` and
`limo::rmsnorm_backward` (fake implementations, autograd) -> the public `rmsnorm`. The public op of
the package is `kernels.rmsnorm`, which picks this file or the torch reference (limo/kernels/dispatch.py).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from limo.kernels.triton_common import LAUNCH_OPTIONS, cast, interpreting

MAX_WIDTH = 65536  # one row lives in registers; wider rows would spill (and no model here needs them)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTERPRETER_TILE = 1 << 14  # elements per program under TRITON_INTERPRET: few, large numpy ops


@triton.jit
def _rmsnorm_fwd_kernel(
    X, R, W, Y, S, RSTD,
    n_rows, n_cols, stride_x, stride_r, stride_y, stride_s, eps,
    HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERP: tl.constexpr,
):
    """One tile of BLOCK_M rows x the whole row (BLOCK_N >= n_cols) per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]  # [BM, BN]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = cast(x.to(ACC) + r.to(ACC), X.dtype.element_ty, INTERP)  # rounded like an unfused `x + r`
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)  # [BM]
    tl.store(RSTD + rows, rstd, mask=row_ok)
    x_hat = cast(xf * rstd[:, None], X.dtype.element_ty, INTERP).to(ACC)  # Qwen2RMSNorm casts before the weight
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(ACC)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast(x_hat * w[None, :], Y.dtype.element_ty, INTERP), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, DS, S, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, stride_dy, stride_ds, stride_s, stride_dx,
    HAS_DY: tl.constexpr, HAS_DS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Persistent: program p handles row tiles p, p + P, p + 2P, ... and writes its dw partial sum.

    dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w, plus ds when the sum s = x + r
    also received a gradient. dw partial = sum over this program's rows of dy * cast(x_hat).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        if HAS_DY:
            s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)  # [BM]
            x_hat = s.to(ACC) * rstd[:, None]
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
            dw += dy * cast(x_hat, S.dtype.element_ty, INTERP).to(ACC)
            g = dy * w[None, :]
            dot = tl.sum(g * x_hat, axis=1) / n_cols  # [BM]
            dx = rstd[:, None] * (g - x_hat * dot[:, None])
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast(dx, DX.dtype.element_ty, INTERP), mask=mask)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Host functions: check the contract, pick tiles, launch.


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(n_rows: int, n_cols: int, interp: bool) -> tuple[int, int, int]:
    """(BLOCK_M rows per program, BLOCK_N >= width, num_warps), for the GPU or (`interp`) the interpreter.

    GPU: one row per program from 4096 wide (a row already fills 8-32 warps with 16-byte
    loads); narrower rows are batched to ~4096 elements per program. Interpreter: tiles of
    ~16k elements, because each program costs a Python-level pass over the kernel body.
    limo/kernels/compile_check.py compiles every GPU tile this gives for the widths we ship.
    """
    block_n = triton.next_power_of_2(n_cols)
    if interp:
        return min(triton.next_power_of_2(max(n_rows, 1)), max(1, _INTERPRETER_TILE // block_n)), block_n, 1
    block_m = max(1, 4096 // block_n)
    return block_m, block_n, min(32, max(4, block_m * block_n // 512))


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"rmsnorm (Triton): {name} is on {t.device}; Triton runs CUDA tensors, or CPU tensors only under "
        "TRITON_INTERPRET=1 set before `kernels` is imported (or choose KERNELS_BACKEND=torch)"
    )


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> None:
    """The forward's contract on shapes, dtypes and eps (the fake implementations check it too)."""
    if x.dim() == 0 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: expected x [..., N] and weight [N]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rmsnorm: x and weight must be one of {SUPPORTED_DTYPES}; got x {x.dtype}, weight {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rmsnorm: residual must match x; got residual {tuple(residual.shape)} {residual.dtype}, x {tuple(x.shape)} {x.dtype}"
        )
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"rmsnorm: width {x.shape[-1]} > {MAX_WIDTH}, the widest row this kernel keeps in registers")
    if not eps >= 0.0:
        raise ValueError(f"rmsnorm: eps must be >= 0, got {eps}")


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., N] -> [M, N] with unit column stride (a view when the layout allows one)."""
    t = t.reshape(-1, n_cols)
    return t if t.stride(1) == 1 else t.contiguous()


def rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., N], weight [N] (, residual like x) -> (y [..., N], s [..., N], rstd [M] fp32/fp64).

    s is x + residual (x itself when there is no residual): the tensor backward needs.
    """
    _check(x, weight, eps, residual)
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None:
            _check_device(t, name)
            if t.device != x.device:
                raise ValueError(f"rmsnorm: {name} is on {t.device} but x is on {x.device}")
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)  # [M, N] or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
    r2 = _rows(residual, n_cols) if residual is not None else x2
    n_rows = x2.shape[0]
    y = torch.empty(n_rows, n_cols, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(x2) if residual is not None else x2
    rstd = torch.empty(n_rows, dtype=_acc_torch_dtype(x.dtype), device=x.device)
    if n_rows:
        block_m, block_n, warps = _tiles(n_rows, n_cols, interpreting())
        _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, r2, weight.contiguous(), y, s, rstd,
            n_rows, n_cols, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), float(eps),
            HAS_RESIDUAL=residual is not None, ACC=_acc_dtype(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
            INTERP=interpreting(), num_warps=warps, **LAUNCH_OPTIONS,
        )
    return y.view(x.shape), s.view(x.shape), rstd


def rmsnorm_bwd(
    dy: torch.Tensor | None, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of rmsnorm_fwd's outputs -> (dx [..., N] in s's dtype, dw [N] in weight's dtype).

    dy is y's gradient and ds the gradient of the returned sum s (either may be None). With a
    residual, dx is also the residual's gradient. dw is None when `need_dw` is false or dy is None.
    """
    n_cols = s.shape[-1]
    s2 = _rows(s, n_cols)  # [M, N]
    n_rows = s2.shape[0]
    dy2 = _rows(dy, n_cols) if dy is not None else s2
    ds2 = _rows(ds, n_cols) if ds is not None else s2
    dx = torch.empty(n_rows, n_cols, dtype=s.dtype, device=s.device)
    block_m, block_n, warps = _tiles(n_rows, n_cols, interpreting())
    n_tiles = triton.cdiv(n_rows, block_m)
    if interpreting() or s.device.type != "cuda":
        programs = min(n_tiles, 4)
    else:
        programs = min(n_tiles, _sm_count(s.device.index or 0) * max(1, 64 // warps))
    partial = torch.empty(max(programs, 1), n_cols, dtype=rstd.dtype, device=s.device)  # [P, N] per-program dw
    if n_rows:
        _rmsnorm_bwd_kernel[(programs,)](
            dy2, ds2, s2, weight.contiguous(), rstd, dx, partial,
            n_rows, n_cols, dy2.stride(0), ds2.stride(0), s2.stride(0), dx.stride(0),
            HAS_DY=dy is not None, HAS_DS=ds is not None, ACC=_acc_dtype(s.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
            INTERP=interpreting(), num_warps=warps, **LAUNCH_OPTIONS,
        )
    else:
        partial.zero_()
    dw = partial.sum(0).to(weight.dtype) if need_dw and dy is not None else None  # fp32 reduction across programs
    return dx.view(s.shape), dw


# ---------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile traces through and FakeTensorMode runs. Two forwards
# (with and without the residual) because an op's outputs are fixed and may not alias its
# inputs: without a residual the sum s is x itself, so that op returns (y, rstd) only.


@torch.library.custom_op("limo::rmsnorm", mutates_args=())
def _rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y [..., N], rstd [M])."""
    y, _, rstd = rmsnorm_fwd(x, weight, eps)
    return y, rstd


@_rmsnorm_op.register_fake
def _rmsnorm_fake(x, weight, eps):
    _check(x, weight, eps, None)
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(math.prod(x.shape[:-1]), dtype=_acc_torch_dtype(x.dtype))


@torch.library.custom_op("limo::rmsnorm_residual", mutates_args=())
def _rmsnorm_residual_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y [..., N], s = x + residual [..., N], rstd [M])."""
    return rmsnorm_fwd(x, weight, eps, residual)


@_rmsnorm_residual_op.register_fake
def _rmsnorm_residual_fake(x, residual, weight, eps):
    _check(x, weight, eps, residual)
    y, rstd = _rmsnorm_fake(x, weight, eps)
    return y, torch.empty_like(x), rstd


@torch.library.custom_op("limo::rmsnorm_backward", mutates_args=())
def _rmsnorm_backward_op(
    dy: torch.Tensor | None, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [..., N], dw [N]); dw is empty ([0]) when `need_dw` is false or dy is None."""
    dx, dw = rmsnorm_bwd(dy, ds, s, weight, rstd, need_dw)
    return dx, dw if dw is not None else weight.new_empty(0)


@_rmsnorm_backward_op.register_fake
def _rmsnorm_backward_fake(dy, ds, s, weight, rstd, need_dw):
    return torch.empty_like(s), torch.empty_like(weight) if need_dw and dy is not None else weight.new_empty(0)


def _backward(ctx, dy, ds):
    """Gradients of (x, [residual,] weight); y's and s's gradients may each be None (unused outputs)."""
    s, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[-2]
    if dy is None and ds is None:
        return (None,) * len(ctx.needs_input_grad)
    dx, dw = _rmsnorm_backward_op(dy, ds, s, weight, rstd, need_dw)
    dw = dw if need_dw and dy is not None else None
    if not ctx.has_residual:
        return dx, dw, None
    return dx, (dx if ctx.needs_input_grad[1] else None), dw, None


def _setup(ctx, inputs, output):
    """Saves exactly (s, weight, rstd): s is x itself without a residual, the returned sum with one."""
    ctx.has_residual = len(inputs) == 4
    x, weight = inputs[0], inputs[-2]
    s = output[1] if ctx.has_residual else x
    rstd = output[-1]
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # an unused output gets None, not a tensor of zeros to read
    ctx.save_for_backward(s, weight, rstd)


_rmsnorm_op.register_autograd(lambda ctx, dy, _: _backward(ctx, dy, None), setup_context=_setup)
_rmsnorm_residual_op.register_autograd(lambda ctx, dy, ds, _: _backward(ctx, dy, ds), setup_context=_setup)


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = weight * (x / rms(x)); with `residual`, normalise s = x + residual and return (y, s).

    Same contract as kernels.reference.rmsnorm. Gradients flow to x, weight and residual;
    with a residual, both y and s may carry gradients.
    """
    if residual is None:
        return _rmsnorm_op(x, weight, float(eps))[0]
    y, s, _ = _rmsnorm_residual_op(x, residual, weight, float(eps))
    return y, s
