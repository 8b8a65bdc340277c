"""Paged KV cache for the sampler: the K/V store and the decode attention over pages.

The cache of one layer is `[num_blocks, block_size, Hkv, D]`: a sequence's token i lives in page
`block_table[i // block_size]` at row `i % block_size`, so sequences grow a page at a time and
the n samples of one prompt can share the prompt's pages. A flat slot is `page * block_size + row`.

Decode attention reads every live K/V byte once per step, so it is memory-bound. One program
handles one (sequence, KV head, split): it loads the G = Hq / Hkv query heads that share the KV
head as one [G, D] tile (grouped-query attention reads each K/V row once, not G times) and runs an
online softmax over its split's tokens. A short batch with long contexts has too few (sequence,
KV head) pairs to fill the GPU, so the context is cut into splits (split-K) whose partial results
(unnormalised output, running max, running sum) a second kernel merges.

Inference only: there is no backward. The two launches are torch.library ops (`limo::store_kv`,
which writes the caches in place, and `limo::paged_attention`) with fake implementations. Without
Triton, paged_attention_torch attends a cache-sized group of sequences at a time; the torch
references, the tests' ground truth, are at the end of limo/kernels/reference.py.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from limo.kernels import reference
from limo.kernels.dispatch import kernel_backend
from limo.kernels.triton_common import LAUNCH_OPTIONS, cast, interpreting

BLOCK_N = 64  # tokens per tile of the attention loop (any page size; each token finds its page)
MIN_TILES_PER_SPLIT = 4  # a split shorter than this costs more to merge than it saves
MAX_SPLITS = 64
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_triton(t: torch.Tensor) -> bool:
    """Whether limo/kernels/dispatch.py gives this tensor the Triton kernels (on CUDA, fake CUDA or in the interpreter)."""
    return kernel_backend(t) == "triton"


# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, T, stride_kt, stride_vt,
    ROW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """BLOCK_T tokens per program: copy each one's [Hkv * D] key and value rows into its slot (slot < 0: skip)."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + toks, mask=toks < T, other=-1).to(tl.int64)
    row_end = tl.where(slots >= 0, ROW, 0)  # [BLOCK_T]; a skipped token stores nothing
    src = toks.to(tl.int64)[:, None]
    dst = slots[:, None] * ROW
    for start in range(0, ROW, BLOCK_R):
        offs = start + tl.arange(0, BLOCK_R)[None, :]
        mask = offs < row_end[:, None]
        k = tl.load(k_ptr + src * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + src * stride_vt + offs, mask=mask)
        tl.store(k_cache_ptr + dst + offs, k, mask=mask)
        tl.store(v_cache_ptr + dst + offs, v, mask=mask)


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, m_ptr, l_ptr,
    qk_scale, partition,
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
    stride_ob, stride_oh, stride_os,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    INTERP: tl.constexpr,
):  # fmt: skip
    """Program (b, kv_head, s): online softmax of the GROUP query heads over tokens [s*partition, ...).

    Scores live in the log2 domain (qk_scale includes log2(e)) so the exponentials are exp2.
    With SPLIT the unnormalised output and its (max, sum) go to per-split scratch; without, the
    normalised output goes straight to out. An empty context gives zeros, not NaN.
    Q K^T multiplies in the cache dtype (exact products, float32 sums). P V keeps P in float32
    (tf32 on the tensor cores for half caches, IEEE for float32) rather than rounding P to bf16 as
    flash kernels do: that rounding nearly tripled the error against torch's; decode is memory-bound,
    so the wider dot costs no time. UPCAST feeds Q K^T float32 copies of bf16 tiles (same products)
    because Triton's interpreter multiplies bf16 bit patterns (triton-lang/triton#11584).
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + b)
    start = s * partition
    end = tl.minimum(context_len, start + partition)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g  # [GROUP_PAD] query heads of this KV head
    gmask, dmask = g < GROUP, d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    for tok0 in range(start, end, BLOCK):
        toks = tok0 + tl.arange(0, BLOCK)
        tmask = toks < end
        page = tl.load(table + toks // PAGE, mask=tmask, other=0).to(tl.int64)
        rows = page * stride_cb + (toks % PAGE) * stride_ct + kvh * stride_ch  # [BLOCK]
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK, D_PAD]
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [GROUP_PAD, BLOCK]
        scores = tl.where(tmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        m = m_new

    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + d[None, :]
    o_mask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        tl.store(o_ptrs, acc, mask=o_mask)
        ml = (b * tl.num_programs(1) * GROUP + heads) * tl.num_programs(2) + s  # [B, Hq, S] scratch
        tl.store(m_ptr + ml, m, mask=gmask)
        tl.store(l_ptr + ml, l, mask=gmask)
    else:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(o_ptrs, cast(out, out_ptr.dtype.element_ty, INTERP), mask=o_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr, num_splits,
    stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """Program (b, q_head): o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over non-empty splits."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    ml = (b * tl.num_programs(1) + h) * num_splits + s
    smask = s < num_splits
    m = tl.load(m_ptr + ml, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + ml, mask=smask, other=0.0)
    live = m > float("-inf")  # empty splits (past the context) hold m = -inf
    m_max = tl.max(tl.where(live, m, -3.0e38), axis=0)
    w = tl.where(live, tl.exp2(m - m_max), 0.0)  # [S_PAD]
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=smask[:, None] & (d < HEAD_DIM)[None, :], other=0.0,
    )  # [S_PAD, D_PAD]
    denom = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, cast(out, out_ptr.dtype.element_ty, INTERP), mask=d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# Host functions: check the contract, plan the grid, launch


def _check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4 or not cache.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [num_blocks, block_size, Hkv, D] tensor, got shape {tuple(cache.shape)} "
                         f"strides {cache.stride()}")


def _check_int_vector(name: str, t: torch.Tensor, length: int) -> None:
    if t.dtype not in (torch.int32, torch.int64) or t.shape != (length,):
        raise ValueError(f"{name} must be an int32/int64 vector of length {length}, got {t.dtype} {tuple(t.shape)}")


def store_tiles(tokens: int, row: int) -> tuple[int, int]:
    """(BLOCK_T tokens per program, BLOCK_R row elements per step): about 4096 elements per program."""
    block_r = min(triton.next_power_of_2(row), 2048)
    return min(triton.next_power_of_2(tokens), max(1, 4096 // block_r)), block_r


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Launch the store: a few tokens per program, rows of Hkv * D contiguous elements."""
    T, Hkv, D = k.shape
    if k.stride(2) != 1 or k.stride(1) != D or v.stride(2) != 1 or v.stride(1) != D:
        raise ValueError(f"k and v must be contiguous within a token ([Hkv, D] rows); strides {k.stride()} and {v.stride()}")
    if T == 0:
        return
    row = Hkv * D
    block_t, block_r = store_tiles(T, row)
    _store_kv_kernel[(triton.cdiv(T, block_t),)](
        k, v, k_cache, v_cache, slot_mapping, T, k.stride(0), v.stride(0), row, block_t, block_r, **LAUNCH_OPTIONS
    )


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; the interpreter on CPU has none, so a small stand-in."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_plan(batch: int, kv_heads: int, max_context_len: int, device: torch.device, num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, partition): enough (sequence, KV head, split) programs to fill the device twice.

    The plan depends only on host ints, so it costs no sync and stays fixed inside a CUDA graph
    captured with max_context_len = max_model_len. partition is a multiple of BLOCK_N tokens.
    """
    return split_plan_for(batch, kv_heads, max_context_len, _num_sms(device), num_splits)


def split_plan_for(batch: int, kv_heads: int, max_context_len: int, sms: int, num_splits: int | None = None) -> tuple[int, int]:
    """split_plan for a device of `sms` multiprocessors (limo/kernels/compile_check.py plans for GPUs it does not have)."""
    tiles = max(1, triton.cdiv(max_context_len, BLOCK_N))
    if num_splits is None:
        wanted = triton.cdiv(2 * sms, max(1, batch * kv_heads))
        num_splits = min(wanted, max(1, tiles // MIN_TILES_PER_SPLIT), MAX_SPLITS)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    tiles_per_split = triton.cdiv(tiles, num_splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * BLOCK_N


def attention_launch(group: int, head_dim: int, page: int, splits: int, dtype: torch.dtype, interp: bool) -> tuple[dict, int]:
    """(constexprs, num_warps) of the decode kernel for G query heads per KV head, a head dim, a page
    size, a split count and a dtype. float32 K/V tiles are twice a half dtype's bytes and its dots
    run on FMAs rather than tensor cores: 8 warps, where 4 spill on sm_80 at head dim 128
    (limo/kernels/compile_check.py)."""
    consts = dict(
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        PAGE=page, BLOCK=BLOCK_N, SPLIT=splits > 1, PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=dtype == torch.bfloat16 and interp, INTERP=interp,
    )
    return consts, 8 if dtype == torch.float32 else 4


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Launch the decode attention (and the split merge when the context is split)."""
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton paged attention takes {TRITON_DTYPES}, got q {q.dtype}")
    if q.stride(2) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be contiguous in its last dim, got strides {block_tables.stride()}")
    out = torch.empty_like(q)
    if B == 0:
        return out
    splits, partition = split_plan(B, Hkv, max_context_len, q.device, num_splits)
    consts, warps = attention_launch(Hq // Hkv, D, page, splits, q.dtype, interpreting())
    qk_scale = scale * math.log2(math.e)
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    if splits == 1:
        _paged_attention_kernel[(B, Hkv, 1)](
            q, k_cache, v_cache, block_tables, context_lens, out, out, out, qk_scale, partition,
            q.stride(0), q.stride(1), *cache_strides, block_tables.stride(0), out.stride(0), out.stride(1), 0, **consts,
            num_warps=warps, **LAUNCH_OPTIONS,
        )  # fmt: skip
        return out
    part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)  # unnormalised outputs
    m = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _paged_attention_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, m, l, qk_scale, partition,
        q.stride(0), q.stride(1), *cache_strides, block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2), **consts,
        num_warps=warps, **LAUNCH_OPTIONS,
    )  # fmt: skip
    _merge_splits_kernel[(B, Hq)](
        part, m, l, out, splits, part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=D, D_PAD=consts["D_PAD"], S_PAD=triton.next_power_of_2(splits), INTERP=interpreting(), **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The torch path (a CPU without the interpreter): sequences in cache-sized groups

GROUP_BYTES = 2 * 2**20  # the K and V one group gathers: about a core's L2, so the SDPA call reads them from cache


def group_size(batch: int, width: int, row_bytes: int, budget_bytes: int = GROUP_BYTES) -> int:
    """Sequences per group: as many whole block-table widths of K and V (`width` tokens of
    `row_bytes` each, K and V) as fit in the budget, at least one."""
    return max(1, min(batch, budget_bytes // max(1, 2 * width * row_bytes)))


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    budget_bytes: int = GROUP_BYTES,
) -> torch.Tensor:
    """reference.paged_attention's result, computed a group of sequences at a time.

    The dense reference gathers the whole batch's pages at once: 134 MB a layer for 64 sequences
    of 4k tokens of the demo model, written to fresh pages and read back from memory, so a step
    cost 6.7x more at 4k than at 1k. Here each group's pages are gathered into one reused buffer
    that stays in cache (group_size), so every live K/V byte is read from memory once and a step's
    time grows linearly with the context; memory is the buffer, whatever the batch.
    """
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    pages = block_tables.long()
    width = pages.shape[1] * block_size
    # A CPU core's cache sets the group; a GPU (the torch backend there) takes the batch in one call.
    group = group_size(B, width, Hkv * D * torch.finfo(dtype).bits // 8, budget_bytes) if q.device.type == "cpu" else max(B, 1)
    buffers = [torch.empty(group * pages.shape[1], block_size, Hkv, D, dtype=k_cache.dtype, device=q.device) for _ in range(2)]
    position = torch.arange(width, device=q.device)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    for start in range(0, B, group):
        rows = slice(start, min(B, start + group))
        n = rows.stop - start
        index = pages[rows].reshape(-1)
        live = position[None, :] < context_lens[rows, None]  # [n, width]
        dead = ~live[:, :, None, None]
        k, v = (torch.index_select(cache, 0, index, out=buffer[: index.numel()]).view(n, width, Hkv, D).to(dtype)
                .masked_fill_(dead, 0.0) for cache, buffer in zip((k_cache, v_cache), buffers))  # fmt: skip
        # Positions past a context are zeroed whatever they held (an uninitialised page, NaN
        # included: a NaN score survives an additive mask), then masked; an empty context gives 0.
        o = F.scaled_dot_product_attention(q[rows].to(dtype)[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=live[:, None, None, :], scale=scale, enable_gqa=True)[:, :, 0]  # fmt: skip
        out[rows] = torch.where(live.any(-1)[:, None, None], o, 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile traces through and FakeTensorMode runs


@torch.library.custom_op("limo::store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    store_kv_triton(k, v, k_cache, v_cache, slot_mapping)


@_store_kv_op.register_fake
def _store_kv_fake(k, v, k_cache, v_cache, slot_mapping):
    return None


@torch.library.custom_op("limo::paged_attention", mutates_args=())
def _paged_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
    num_splits: int | None,
) -> torch.Tensor:
    return paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale, num_splits)


@_paged_attention_op.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale, num_splits):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------
# Public functionals


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] into the caches [num_blocks, block_size, Hkv, D] at flat slots [T].

    A negative slot skips its token (padding rows of a CUDA-graph batch).
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected k and v [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_cache(name, cache)
        if cache.shape[2:] != k.shape[1:] or cache.dtype != k.dtype or cache.device != k.device:
            raise ValueError(f"{name} {tuple(cache.shape)} {cache.dtype} {cache.device} does not hold k {tuple(k.shape)} {k.dtype} "
                             f"{k.device}")
    _check_int_vector("slot_mapping", slot_mapping, k.shape[0])
    if _use_triton(k):
        _store_kv_op(k, v, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One query token per sequence attends to the first context_lens[b] tokens of its pages.

    q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D] with Hq a multiple of Hkv;
    block_tables [B, max_blocks] int32 (pages in order; entries past the context are ignored);
    context_lens [B] int32, each <= max_context_len (a host int: it sizes the split grid without a
    sync). num_splits overrides the split-K plan. Returns [B, Hq, D] in q's dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"expected q [B, Hq, D], got {tuple(q.shape)}")
    B, Hq, D = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_cache(name, cache)
        if cache.shape[3] != D or Hq % cache.shape[2] or cache.dtype != q.dtype or cache.device != q.device:
            raise ValueError(f"{name} {tuple(cache.shape)} {cache.dtype} does not fit q {tuple(q.shape)} {q.dtype} "
                             "(head dims must agree, Hq must be a multiple of Hkv, dtypes and devices equal)")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be int32 [B={B}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    if block_tables.shape[1] * k_cache.shape[1] < max_context_len:
        raise ValueError(f"block_tables has {block_tables.shape[1]} pages of {k_cache.shape[1]} tokens: too few for "
                         f"max_context_len={max_context_len}")
    _check_int_vector("context_lens", context_lens, B)
    scale = D**-0.5 if scale is None else scale
    if _use_triton(q):
        return _paged_attention_op(q, k_cache, v_cache, block_tables, context_lens, max_context_len, float(scale), num_splits)
    return paged_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)
