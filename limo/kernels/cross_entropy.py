"""Fused linear cross-entropy: loss(hidden @ weight.T, targets) without the [T, V] logits.

At 16k tokens and Qwen2.5's 152,064-token vocabulary the logits alone are 4.6 GiB in bf16. Here
the tokens go in chunks of C rows (C chosen from a memory budget): one matmul makes the chunk's
logits [C, V]; a Triton kernel turns them, in place, into the logits' gradient
softmax * (1 + 2 z lse) - onehot(target) while it writes each token's loss; two more matmuls
take that gradient to dhidden (the chunk's rows, written once) and dweight (summed over chunks).
Both gradients are kept in fp32 (cuBLAS writes the bf16 products in fp32 directly), so dweight
does not drift as chunks are added in bf16; the backward pass only scales them by the incoming
gradient and casts once. Nothing syncs with the host: the "mean" divisor stays on the device,
and an all-ignored chunk simply contributes zero loss and zero gradient.

Memory beyond the inputs: the chunk's logits (C x V in hidden's dtype) and the fp32 gradients
(T x H and V x H, 4 bytes each), plus the returned gradients when backward casts them.

Two implementations of the per-chunk step share everything else (chunking, matmuls, autograd):
the Triton kernel, and `_loss_grad_torch`, the same computation in torch ops for the "torch"
backend (a CPU without Triton's interpreter). The torch one works in place on the chunk's logits
too, so neither backend ever holds [T, V]. PyTorch >= 2.13's `F.linear_cross_entropy` chunks as
well, but it has no z-loss, accumulates dweight in the input's dtype and is absent from the
torch 2.11 our GPU machines run, so it cannot serve this contract.

Layout (STYLE.md): @triton.jit kernel (and its torch twin) -> host `linear_cross_entropy_fwd` ->
the torch.library op `limo::linear_cross_entropy` (fake implementation, autograd) -> the public
`fused_linear_cross_entropy`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from limo.kernels.dispatch import path_of, shapes_only
from limo.kernels.triton_common import LAUNCH_OPTIONS, cast, interpreting

LOGITS_BUDGET_BYTES = 1 << 30  # the chunk's logits buffer on a GPU; C is the largest multiple of 256 tokens under it
# On a CPU the ranks of one host share its RAM and a matmul needs no big tiles: a smaller chunk.
CPU_LOGITS_BUDGET_BYTES = 1 << 28
BACKENDS = ("triton", "torch")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTERPRETER_TILE = 1 << 14  # elements per program under TRITON_INTERPRET


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS, TARGETS, LOSS,
    n_rows, n_cols, stride_row, ignore_index, z_loss,
    WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, INTERP: tl.constexpr,
):
    """BLOCK_T rows per program, swept in BLOCK_V columns, twice.

    Pass 1: online max / sum-exp -> lse, and the target's logit -> loss. Pass 2 (WRITE_GRAD):
    overwrite the logits with d loss / d logits. The true class's "-1" is applied in ACC
    before the single rounding to the logits' dtype. Ignored rows load nothing (masked) and get
    zero loss and zero gradient; a target outside [0, V) gives NaN loss and NaN gradient.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    in_range = rows < n_rows
    target = tl.load(TARGETS + rows, mask=in_range, other=ignore_index).to(tl.int64)  # [BT]
    active = in_range & (target != ignore_index)
    bad = active & ((target < 0) | (target >= n_cols))
    row_ptr = LOGITS + rows.to(tl.int64) * stride_row  # [BT]
    cols = tl.arange(0, BLOCK_V)  # [BV]

    m = tl.full([BLOCK_T], float("-inf"), ACC)
    d = tl.zeros([BLOCK_T], ACC)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        x = tl.load(row_ptr[:, None] + c[None, :], mask=active[:, None] & (c < n_cols)[None, :], other=float("-inf"))
        x = x.to(ACC)  # [BT, BV]
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing loaded yet
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(active, m + tl.log(tl.where(active, d, 1.0)), 0.0)  # [BT]; 0 on inactive rows
    x_t = tl.load(row_ptr + target, mask=active & ~bad, other=0.0).to(ACC)
    loss = tl.where(bad, float("nan"), lse - x_t + z_loss * lse * lse)
    tl.store(LOSS + rows, tl.where(active, loss, 0.0), mask=in_range)

    if WRITE_GRAD:
        coef = tl.where(bad, float("nan"), 1.0 + 2.0 * z_loss * lse)  # d(z lse^2)/d lse = 2 z lse
        for start in range(0, n_cols, BLOCK_V):
            c = start + cols
            mask = in_range[:, None] & (c < n_cols)[None, :]
            x = tl.load(row_ptr[:, None] + c[None, :], mask=active[:, None] & mask, other=0.0).to(ACC)
            g = tl.exp(x - lse[:, None]) * coef[:, None] - tl.where(c[None, :] == target[:, None], 1.0, 0.0)
            g = tl.where(active[:, None], g, 0.0)
            tl.store(row_ptr[:, None] + c[None, :], cast(g, LOGITS.dtype.element_ty, INTERP), mask=mask)


def _loss_grad_torch(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, ignore_index: int, z_loss: float,
                     write_grad: bool, acc: torch.dtype) -> None:
    """The kernel's contract in torch ops: losses [n] written, logits [n, V] overwritten by their
    gradient when `write_grad`. In place, so the chunk costs no second [n, V] buffer in the
    accumulation dtype; a half-precision chunk is taken to fp32 (one temporary of the chunk's
    size), worked on there and rounded back once, as the kernel rounds its gradient once."""
    vocab = logits.shape[1]
    active = targets != ignore_index  # [n]
    bad = active & ((targets < 0) | (targets >= vocab))
    safe = torch.where(active & ~bad, targets, 0).long()[:, None]  # [n, 1]
    x = logits if logits.dtype == acc else logits.to(acc)  # [n, V]
    x_t = x.gather(1, safe).squeeze(1)  # [n], before x is overwritten
    m = x.amax(dim=1)  # [n]
    m = torch.where(torch.isfinite(m), m, 0.0)  # an all -inf row stays -inf below, not NaN from inf - inf
    x.sub_(m[:, None]).exp_()  # [n, V]: exp(x - m), in place
    d = x.sum(dim=1)
    lse = m + d.log()
    loss = torch.where(bad, float("nan"), lse - x_t + z_loss * lse * lse)
    losses.copy_(torch.where(active, loss, 0.0))
    if write_grad:
        coef = torch.where(bad, float("nan"), (1.0 + 2.0 * z_loss * lse) / d)  # softmax = exp(x - m) / d
        x.mul_(coef[:, None])
        x.scatter_add_(1, safe, torch.where(active & ~bad, -1.0, 0.0).to(acc)[:, None])  # - onehot(target)
        x.masked_fill_(~active[:, None], 0.0)
        if x is not logits:
            logits.copy_(x)


# ---------------------------------------------------------------------------------------------
# Host side: contract checks, chunking, the matmuls, launch.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_tokens(n_tokens: int, vocab: int, dtype: torch.dtype, budget_bytes: int | None = None, device_type: str = "cuda") -> int:
    """Tokens per chunk: the largest multiple of 256 whose [C, V] logits fit the budget (at least 256).

    256-row multiples keep the three matmuls on full tensor-core tiles; at V = 152,064 in bf16
    the default 1 GiB gives C = 3,328, enough rows that the fp32 dweight update (K = C) stays
    compute-bound. A CPU's default budget is 256 MiB (limo/engine/memory.py plans with this rule).
    """
    default = LOGITS_BUDGET_BYTES if device_type == "cuda" else CPU_LOGITS_BUDGET_BYTES
    budget = default if budget_bytes is None else budget_bytes
    per_token = vocab * torch.empty((), dtype=dtype).element_size()
    return max(1, min(n_tokens, max(256, budget // per_token // 256 * 256)))


def _tiles(n_cols: int, interp: bool) -> tuple[int, int, int]:
    """(BLOCK_T rows per program, BLOCK_V columns per step, num_warps), for the GPU or (`interp`) the interpreter.

    limo/kernels/compile_check.py compiles every GPU tile this gives for the vocabularies we ship.
    """
    if interp:
        block_v = min(triton.next_power_of_2(n_cols), _INTERPRETER_TILE)
        return max(1, _INTERPRETER_TILE // block_v), block_v, 1
    return 1, min(triton.next_power_of_2(n_cols), 4096), 8


def _matmul_acc(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (fp32/fp64) = a @ b, or out += a @ b, with the product never rounded to a/b's half dtype.

    On CUDA cuBLAS writes its fp32 accumulator straight into `out` (torch's out_dtype overloads,
    as Liger-Kernel uses them). CPU kernels lack those overloads, so there the half operands are
    upcast first: the same sums of exact products, at the cost of a copy (CPU runs are tests).
    """
    if a.dtype != out.dtype and a.is_cuda:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        return
    if a.dtype != out.dtype:
        a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str, z_loss: float,
           backend: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy: expected hidden [T, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"fused_linear_cross_entropy: expected targets [T={hidden.shape[0]}] int32/int64; got {tuple(targets.shape)} {targets.dtype}"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"fused_linear_cross_entropy: hidden and weight must share one of {SUPPORTED_DTYPES}; got {hidden.dtype}, {weight.dtype}"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    if not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"fused_linear_cross_entropy: z_loss must be finite and >= 0, got {z_loss}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"fused_linear_cross_entropy: hidden {hidden.device}, weight {weight.device}, targets {targets.device} differ")
    if backend not in BACKENDS:
        raise ValueError(f"fused_linear_cross_entropy: backend must be one of {BACKENDS}, got {backend!r}")
    if targets.device.type == "cpu" and not shapes_only(targets):
        # Free on CPU; on CUDA the kernel gives such tokens a NaN loss instead of syncing. Fake
        # tensors and torch.compile traces have no values to check.
        vocab = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bad.any():
            raise ValueError(f"fused_linear_cross_entropy: targets outside [0, {vocab}) at positions {bad.nonzero()[:8, 0].tolist()}")


def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    need_dhidden: bool = True,
    need_dweight: bool = True,
    chunk_size: int | None = None,
    backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden [T, H], weight [V, H], targets [T] -> (loss per token [T], dhidden [T, H], dweight [V, H]).

    Losses and gradients are fp32 (fp64 for fp64 inputs) and unscaled: the gradient of the
    summed loss. A gradient not asked for is None and its matmul is skipped. `backend` picks
    the per-chunk step: the Triton kernel or its torch twin.
    """
    if backend == "triton" and hidden.device.type != "cuda" and not (hidden.device.type == "cpu" and interpreting()):
        raise RuntimeError(
            f"fused_linear_cross_entropy (Triton): tensors are on {hidden.device}; Triton runs CUDA tensors, or CPU "
            "tensors only under TRITON_INTERPRET=1 set before `kernels` is imported (or choose KERNELS_BACKEND=torch)"
        )
    n_tokens, _ = hidden.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    chunk = chunk_size or chunk_tokens(n_tokens, vocab, hidden.dtype, device_type=hidden.device.type)
    if chunk < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk}")
    targets = targets.contiguous()
    grad = need_dhidden or need_dweight
    losses = torch.empty(n_tokens, dtype=acc, device=hidden.device)
    dhidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_dhidden else None
    dweight = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_dweight else None
    logits = torch.empty(min(chunk, n_tokens), vocab, dtype=hidden.dtype, device=hidden.device)  # [C, V], reused
    block_t, block_v, warps = _tiles(vocab, interpreting())
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h = hidden[start:end]  # [n, H]
        lg = logits[: end - start]  # [n, V]
        torch.mm(h, weight.T, out=lg)
        if backend == "torch":
            _loss_grad_torch(lg, targets[start:end], losses[start:end], ignore_index, float(z_loss), grad, acc)
        else:
            _ce_loss_grad_kernel[(triton.cdiv(end - start, block_t),)](
                lg, targets[start:end], losses[start:end],
                end - start, vocab, lg.stride(0), ignore_index, float(z_loss),
                WRITE_GRAD=grad, ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_T=block_t, BLOCK_V=block_v,
                INTERP=interpreting(), num_warps=warps, **LAUNCH_OPTIONS,
            )
        if need_dhidden:
            _matmul_acc(dhidden[start:end], lg, weight, accumulate=False)  # [n, V] @ [V, H]: this chunk's rows
        if need_dweight:
            _matmul_acc(dweight, lg.T, h, accumulate=True)  # [V, n] @ [n, H], summed over chunks in fp32
    return losses, dhidden, dweight


# ---------------------------------------------------------------------------------------------
# The torch.library op: what torch.compile traces through and FakeTensorMode runs. The forward
# computes the gradients too, so the op returns them (fp32, unscaled) beside the loss; autograd
# keeps them on its context and backward only scales and casts them, once. A gradient not
# asked for comes back empty ([0]): an op's outputs are fixed.


@torch.library.custom_op("limo::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    chunk_size: int | None,
    backend: str,
    need_dhidden: bool,
    need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [] summed or averaged, dhidden [T, H] or [0], dweight [V, H] or [0]), fp32 (fp64 for fp64 inputs)."""
    losses, dhidden, dweight = linear_cross_entropy_fwd(
        hidden, weight, targets, ignore_index, z_loss, need_dhidden, need_dweight, chunk_size, backend
    )
    total = losses.sum()
    if reduction == "mean":
        total = total / _supervised(targets, ignore_index).to(total.dtype)
    empty = losses.new_empty(0)
    return total, dhidden if dhidden is not None else empty, dweight if dweight is not None else empty.clone()


@_linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(hidden, weight, targets, ignore_index, reduction, z_loss, chunk_size, backend, need_dhidden, need_dweight):
    acc = _acc_dtype(hidden.dtype)
    dhidden = hidden.new_empty(hidden.shape if need_dhidden else (0,), dtype=acc)
    dweight = hidden.new_empty(weight.shape if need_dweight else (0,), dtype=acc)
    return hidden.new_empty((), dtype=acc), dhidden, dweight


def workspace_bytes(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int | None, backend: str) -> int:
    """The op's working memory beside its outputs, which no dispatch mode sees inside it: the
    chunk's logits, and the torch twin's fp32 copy of a half chunk (limo/engine/simulate.py adds it)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk = min(chunk_size or chunk_tokens(n_tokens, vocab, hidden.dtype, device_type=path_of(hidden)[0]), n_tokens)
    acc = _acc_dtype(hidden.dtype)
    copy = chunk * vocab * acc.itemsize if backend == "torch" and hidden.dtype != acc else 0
    return chunk * vocab * hidden.dtype.itemsize + copy



def _supervised(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """max(#supervised tokens, 1), on the device: the "mean" divisor, without a host sync."""
    return (targets != ignore_index).sum().clamp(min=1)


def _setup(ctx, inputs, output):
    hidden, weight, targets, ignore_index, reduction = inputs[:5]
    need_dhidden, need_dweight = inputs[-2:]
    _, dhidden, dweight = output
    ctx.mark_non_differentiable(dhidden, dweight)
    ctx.grads = (dhidden if need_dhidden else None, dweight if need_dweight else None)
    ctx.dtypes = (hidden.dtype, weight.dtype)
    ctx.mean = (targets, ignore_index) if reduction == "mean" else None


def _scaled(grad: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * g in `dtype`, in one pass: the product is rounded once, straight into the new tensor."""
    return torch.mul(grad, g, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


def _backward(ctx, grad_total, _dhidden, _dweight):
    if ctx.grads is None:
        raise RuntimeError(
            "fused_linear_cross_entropy: backward ran twice through one forward; its gradients are computed in the "
            "forward and handed over once (run the forward again instead of retain_graph=True)"
        )
    dhidden, dweight = ctx.grads
    ctx.grads = None  # free the fp32 buffers as soon as the cast copies exist
    if dhidden is None and dweight is None:
        return (None,) * 10
    g = grad_total.to(dhidden.dtype if dhidden is not None else dweight.dtype)
    if ctx.mean is not None:
        g = g / _supervised(*ctx.mean).to(g.dtype)
    grad_hidden = _scaled(dhidden, g, ctx.dtypes[0]) if dhidden is not None else None
    del dhidden
    grad_weight = _scaled(dweight, g, ctx.dtypes[1]) if dweight is not None else None
    return (grad_hidden, grad_weight) + (None,) * 8


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.limo.linear_cross_entropy)
def _matmul_flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """For torch's FLOP counter, which sees an op whole: the logits' matmul and one per gradient asked for."""
    (tokens, hidden), vocab = hidden_shape, weight_shape[0]
    need_dhidden, need_dweight = args[-2:]
    return 2 * tokens * hidden * vocab * (1 + need_dhidden + need_dweight)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "sum",
    z_loss: float = 0.0,
    *,
    chunk_size: int | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, never materialising [T, V].

    Per token: lse - logit[target] (+ z_loss * lse^2); ignored tokens contribute 0; "mean"
    divides by max(#supervised, 1). Returns a 0-dim fp32 tensor (fp64 for fp64 inputs).
    `chunk_size` overrides the tokens per chunk (default: chunk_tokens, from a 1 GiB budget on
    a GPU). `backend` is "triton" (the kernel) or "torch" (the same chunks in torch ops).
    """
    _check(hidden, weight, targets, ignore_index, reduction, z_loss, backend)
    grad = torch.is_grad_enabled()
    need_dhidden, need_dweight = grad and hidden.requires_grad, grad and weight.requires_grad
    total, _, _ = _linear_cross_entropy_op(
        hidden, weight, targets, ignore_index, reduction, float(z_loss), chunk_size, backend, need_dhidden, need_dweight
    )
    return total
