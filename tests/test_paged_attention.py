"""Paged KV store and paged decode attention (Triton: compiled on a GPU, interpreted on CPU) against float64 references."""

import os

import pytest
import torch
import torch.nn.functional as F

from limo import kernels
from limo.kernels import paged_attention as pa
from limo.kernels import reference
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _paged_case(Hq, Hkv, D, page, lens, dtype, seed=0, width_extra=2):
    """Caches filled with NaN except the pages the sequences own (shuffled), which hold random K/V."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // page) for n in lens]
    num_blocks = sum(pages) + 5
    width = max(pages) + width_extra
    k_cache = torch.full((num_blocks, page, Hkv, D), float("nan"), dtype=torch.float64)
    v_cache = k_cache.clone()
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(lens), width), generator=g, dtype=torch.int32)  # garbage past the context
    used = 0
    for b, n in enumerate(lens):
        own = order[used : used + pages[b]]
        used += pages[b]
        tables[b, : pages[b]] = own.int()
        for i in range(n):  # only the first n rows of the sequence's pages are live
            k_cache[own[i // page], i % page] = torch.randn(Hkv, D, generator=g, dtype=torch.float64)
            v_cache[own[i // page], i % page] = torch.randn(Hkv, D, generator=g, dtype=torch.float64)
    q = torch.randn(len(lens), Hq, D, generator=g, dtype=torch.float64)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return q.to(DEVICE, dtype), k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), tables.to(DEVICE), context_lens.to(DEVICE)


CASES = {
    # name: Hq, Hkv, D, page, context lengths, num_splits
    "gqa6-d8-page16": (6, 1, 8, 16, [1, 17, 37], None),
    "gqa5-d24-page7-split3": (10, 2, 24, 7, [300, 37, 1], 3),
    "mha-d20-page5-split4-ragged": (3, 3, 20, 5, [130, 5, 64, 1], 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_paged_attention_matches_float64_reference(name):
    Hq, Hkv, D, page, lens, splits = CASES[name]
    q, kc, vc, tables, cl = _paged_case(Hq, Hkv, D, page, lens, torch.float32)
    want = reference.paged_attention(q.double(), kc.double(), vc.double(), tables, cl)
    got = pa.paged_attention_triton(q, kc, vc, tables, cl, max(lens), D**-0.5, splits)
    assert got.dtype == torch.float32 and not got.isnan().any()
    assert rel_err(got, want) < 2e-6


def test_bf16_error_within_torch_bf16_error():
    Hq, Hkv, D, page, lens = 10, 2, 128, 16, [300, 37, 1]
    q, kc, vc, tables, cl = _paged_case(Hq, Hkv, D, page, lens, torch.bfloat16, seed=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # torch's dense SDPA below reads whole pages
    want = reference.paged_attention(q.double(), kc.double(), vc.double(), tables, cl)
    got = pa.paged_attention_triton(q, kc, vc, tables, cl, max(lens), D**-0.5, 2)
    dense = []
    for b, n in enumerate(lens):  # torch's own bf16 attention over the same gathered K/V
        k = kc[tables[b].long()].flatten(0, 1)[:n].transpose(0, 1)  # [Hkv, n, D]
        v = vc[tables[b].long()].flatten(0, 1)[:n].transpose(0, 1)
        dense.append(F.scaled_dot_product_attention(q[b][:, None], k, v, enable_gqa=True)[:, 0])
    torch_err = rel_err(torch.stack(dense), want)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 1.05 * torch_err, (rel_err(got, want), torch_err)


def test_split_k_plans_agree():
    q, kc, vc, tables, cl = _paged_case(6, 2, 16, 16, [400, 3, 250], torch.float32, seed=2)
    outs = [pa.paged_attention_triton(q, kc, vc, tables, cl, 400, 0.3, s) for s in (1, 2, 7)]
    assert pa.split_plan(3, 2, 400, q.device, 7)[0] == 7  # 7 tiles of 64: one split each, some empty for short rows
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-6


def test_empty_context_gives_zeros():
    q, kc, vc, tables, cl = _paged_case(4, 2, 16, 8, [5, 9], torch.float32, seed=3)
    cl = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        got = pa.paged_attention_triton(q, kc, vc, tables, cl, 9, 0.25, splits)
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        assert rel_err(got[1], reference.paged_attention(q.double(), kc.double(), vc.double(), tables, cl, 0.25)[1]) < 2e-6


@pytest.mark.parametrize("budget", [1, 40_000, pa.GROUP_BYTES], ids=["a-sequence-a-group", "groups-of-2-or-3", "one-group"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_path_matches_float64_reference(name, budget):
    """The CPU path without Triton: groups of sequences (a ragged last one included), NaN in every
    page a sequence does not own, and in float64 the reference's own values."""
    Hq, Hkv, D, page, lens, _ = CASES[name]
    q, kc, vc, tables, cl = (t.cpu() for t in _paged_case(Hq, Hkv, D, page, lens + [0], torch.float32, seed=7))
    want = reference.paged_attention(q.double(), kc.double(), vc.double(), tables, cl)
    got = pa.paged_attention_torch(q, kc, vc, tables, cl, D**-0.5, budget)
    assert got.dtype == torch.float32 and not got.isnan().any()
    assert rel_err(got, want) < 2e-6 and torch.equal(got[-1], torch.zeros_like(got[-1]))  # the empty context: zeros
    exact = pa.paged_attention_torch(q.double(), kc.double(), vc.double(), tables, cl, D**-0.5, budget)
    assert rel_err(exact, want) < 1e-13


def test_torch_path_bf16_error_within_torch_bf16_error():
    Hq, Hkv, D, page, lens = 10, 2, 128, 16, [300, 37, 1]
    q, kc, vc, tables, cl = (t.cpu() for t in _paged_case(Hq, Hkv, D, page, lens, torch.bfloat16, seed=8))
    want = reference.paged_attention(q.double(), kc.double(), vc.double(), tables, cl)
    got = pa.paged_attention_torch(q, kc, vc, tables, cl, D**-0.5, budget_bytes=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    dense = []
    for b, n in enumerate(lens):  # torch's own bf16 attention over the same K/V
        k = kc[tables[b].long()].flatten(0, 1)[:n].transpose(0, 1)
        v = vc[tables[b].long()].flatten(0, 1)[:n].transpose(0, 1)
        dense.append(F.scaled_dot_product_attention(q[b][:, None], k, v, enable_gqa=True)[:, 0])
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 1.05 * rel_err(torch.stack(dense), want)


def test_torch_path_groups_fit_the_budget():
    """A group's gathered K and V fit GROUP_BYTES (at least one sequence): the CPU path's memory
    is one group's, whatever the batch, where the dense reference held the whole batch's."""
    row = 2 * 32 * 4  # the demo model's Hkv x D in float32
    assert pa.group_size(64, 1024, row) == 2**21 // (2 * 1024 * row) == 4
    assert pa.group_size(64, 8192, row) == 1 and pa.group_size(3, 16, row) == 3
    for batch, width in [(256, 32768), (64, 4096), (7, 100)]:
        g = pa.group_size(batch, width, 4 * 128 * 4)
        assert 1 <= g <= batch and (g == 1 or 2 * g * width * 4 * 128 * 4 <= pa.GROUP_BYTES)


def test_torch_backend_takes_the_grouped_path(monkeypatch):
    kernels.set_backend("torch")
    try:
        q, kc, vc, tables, cl = (t.cpu() for t in _paged_case(4, 2, 16, 8, [5, 20], torch.float32, seed=9))
        monkeypatch.setattr(reference, "paged_attention", lambda *a, **k: pytest.fail("the dense reference ran on the CPU path"))
        calls = []
        real = pa.paged_attention_torch
        monkeypatch.setattr(pa, "paged_attention_torch", lambda *a: calls.append(1) or real(*a))
        pa.paged_attention(q, kc, vc, tables, cl, 20)
        assert calls
    finally:
        kernels.set_backend("auto")


def test_split_plan_covers_context():
    for batch, heads, ctx in [(1, 8, 32768), (256, 8, 32768), (3, 2, 1), (1, 1, 65), (4, 2, 1000)]:
        splits, partition = pa.split_plan(batch, heads, ctx, torch.device(DEVICE))
        assert partition % pa.BLOCK_N == 0 and 1 <= splits <= pa.MAX_SPLITS
        assert (splits - 1) * partition < ctx <= splits * partition or (ctx <= partition and splits == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference(dtype):
    g = torch.Generator().manual_seed(4)
    T, Hkv, D, num_blocks, page = 37, 3, 24, 9, 5
    k = torch.randn(T, Hkv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(T, Hkv, D, generator=g).to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * page, generator=g)[:T].int()
    slots[[3, 20, 36]] = -1  # padding rows store nothing
    slots = slots.to(DEVICE)
    caches = [torch.randn(num_blocks, page, Hkv, D, generator=g).to(DEVICE, dtype) for _ in range(2)]
    want = [c.clone() for c in caches]
    reference.store_kv(k, v, *want, slots)
    pa.store_kv_triton(k, v, *caches, slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])
    flat = want[0].view(-1, Hkv, D)
    assert torch.equal(flat[slots[0].long()], k[0]) and not torch.equal(flat[slots[4].long()], caches[0].view(-1, Hkv, D)[0] * 0)


def test_public_functions_run_triton(monkeypatch):
    assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    assert pa._use_triton(torch.zeros(1, device=DEVICE))

    def forbidden(*args, **kwargs):
        raise AssertionError("the torch reference ran where the Triton kernel should have")

    q, kc, vc, tables, cl = _paged_case(4, 2, 16, 8, [5, 20], torch.float32, seed=5)
    want = reference.paged_attention(q.double(), kc.double(), vc.double(), tables, cl)
    k = torch.randn(3, 2, 16, device=DEVICE)
    slots = torch.tensor([0, 1, -1], dtype=torch.int32, device=DEVICE)
    kc2, vc2 = torch.zeros(2, 8, 2, 16, device=DEVICE), torch.zeros(2, 8, 2, 16, device=DEVICE)
    monkeypatch.setattr(reference, "paged_attention", forbidden)
    monkeypatch.setattr(reference, "store_kv", forbidden)
    assert rel_err(pa.paged_attention(q, kc, vc, tables, cl, 20), want) < 2e-6
    pa.store_kv(k, 2 * k, kc2, vc2, slots)
    assert torch.equal(kc2[0, :2], k[:2]) and torch.equal(vc2[0, :2], 2 * k[:2]) and not kc2[0, 2:].any()


def test_contract_errors_name_the_tensor():
    q, kc, vc, tables, cl = _paged_case(4, 2, 16, 8, [5, 9], torch.float32)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        pa.paged_attention(q, kc, vc, tables.long(), cl, 9)
    with pytest.raises(ValueError, match="too few for max_context_len"):
        pa.paged_attention(q, kc, vc, tables[:, :1], cl, 9)
    with pytest.raises(ValueError, match="k_cache"):
        pa.paged_attention(q, kc.double(), vc, tables, cl, 9)
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):
        pa.paged_attention(q[:, :3], kc, vc, tables, cl, 9)
    with pytest.raises(ValueError, match="context_lens"):
        pa.paged_attention(q, kc, vc, tables, cl[:1], 9)
    with pytest.raises(ValueError, match="contiguous"):
        pa.store_kv(q[:, :2], q[:, :2], kc.transpose(1, 2), vc, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping"):
        pa.store_kv(q[:, :2], q[:, :2], kc, vc, torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="takes"):
        pa.paged_attention_triton(q.double(), kc.double(), vc.double(), tables, cl, 9, 1.0)


def test_ops_pass_torch_library_opcheck():
    """Schema (store_kv declares the caches it writes) and fake implementations, as torch checks them."""
    q, kc, vc, tables, cl = _paged_case(4, 2, 16, 8, [5, 20], torch.float32, seed=6)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    torch.library.opcheck(torch.ops.limo.paged_attention.default, (q, kc, vc, tables, cl, 20, 0.25, 2), test_utils=("test_schema", "test_faketensor"))
    k = torch.randn(3, 2, 16, device=DEVICE)
    slots = torch.tensor([0, 9, -1], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.limo.store_kv.default, (k, 2 * k, kc, vc, slots), test_utils=("test_schema", "test_faketensor"))


def test_fake_gpu_tensors_take_the_triton_ops():
    """A decode step of Qwen2.5-7B's shapes on fake GPU tensors: the ops' fake implementations answer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.fake_gpu import fake_gpu

    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.namespace)
            return func(*args, **(kwargs or {}))

    with fake_gpu() as device, Ops():
        q = torch.empty(64, 28, 128, device=device, dtype=torch.bfloat16)
        kc, vc = (torch.empty(4096, 16, 4, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        tables = torch.zeros(64, 2048, device=device, dtype=torch.int32)
        cl = torch.zeros(64, device=device, dtype=torch.int32)
        pa.store_kv(q[:, :4], q[:, :4], kc, vc, cl)
        out = pa.paged_attention(q, kc, vc, tables, cl, 32768)
    assert out.shape == q.shape
    assert seen.count("limo") == 2
