"""Varlen attention: every backend that can run here against a float64 dense block-diagonal mask.

On CPU only the reference can run; on a CUDA machine the same tests also cover flash-attn and
torch's varlen_attn (each backend that is available there), so the GPU checks need no skip.
"""

import logging
from pathlib import Path

import pytest
import torch

from limo.kernels import attention, dispatch, reference
from limo.model.init import init_weights
from tests.conftest import rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AVAILABLE = [b for b in dispatch.ATTENTION_BACKENDS if dispatch.attention_unavailable(b, DEVICE.type) is None]
HALF_ONLY = {"flash", "torch_varlen"}  # fused kernels take fp16/bf16 only

# 37 tokens with an empty sample, a one-token sample and odd lengths.
LENGTHS = [5, 1, 0, 17, 14]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def dense(q, k, v, lengths, scale=None):
    """Attention over the whole stream under a block-diagonal causal mask, every op in q's dtype."""
    T, Hq, D = q.shape
    k, v = k.repeat_interleave(Hq // k.shape[1], dim=1), v.repeat_interleave(Hq // k.shape[1], dim=1)  # [T, Hq, D]
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [T]
    pos = torch.arange(T)
    allowed = (sample[:, None] == sample[None, :]) & (pos[None, :] <= pos[:, None])  # [T, T]
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale if scale is not None else D**-0.5)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def dense_reference(q, k, v, lengths, scale=None):
    """The float64 ground truth."""
    return dense(q.double(), k.double(), v.double(), lengths, scale)


def _qkv(seed, hq=6, hkv=2, d=16, dtype=torch.float64, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    return [torch.randn(T, h, d, generator=g, dtype=torch.float64).to(dtype) for h in (hq, hkv, hkv)]


@pytest.fixture
def backend(request, monkeypatch):
    """Force one backend for the test, through the same environment switch users have."""
    monkeypatch.setenv("ATTENTION_BACKEND", request.param)
    dispatch._attention.clear()
    yield request.param
    dispatch._attention.clear()


@pytest.mark.parametrize("backend", AVAILABLE, indirect=True)
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (5, 1)], ids=["gqa3", "mha", "mqa"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_dense_float64(backend, heads, scale):
    dtype = torch.bfloat16 if backend in HALF_ONLY else torch.float64
    q, k, v = (t.to(DEVICE) for t in _qkv(1, *heads, dtype=dtype))
    got = attention.varlen_attention(q, k, v, _cu(LENGTHS).to(DEVICE), max(LENGTHS), scale)
    want = dense_reference(q.cpu(), k.cpu(), v.cpu(), LENGTHS, scale)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float64:
        assert rel_err(got.cpu(), want) < 1e-12
    else:  # bf16: no worse than twice torch's own bf16 attention on the same rounded inputs
        assert rel_err(got.cpu(), want) <= 2 * rel_err(dense(q.cpu(), k.cpu(), v.cpu(), LENGTHS, scale), want)


@pytest.mark.parametrize("backend", AVAILABLE, indirect=True)
def test_gradients_match_dense_float64(backend):
    dtype = torch.bfloat16 if backend in HALF_ONLY else torch.float64
    q, k, v = (t.to(DEVICE).requires_grad_() for t in _qkv(2, dtype=dtype))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = attention.varlen_attention(q, k, v, _cu(LENGTHS).to(DEVICE), max(LENGTHS))
    out.backward(grad_out.to(DEVICE, dtype))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    dense_reference(q64, k64, v64, LENGTHS).backward(grad_out)
    grads = {"dq": (q.grad, q64.grad), "dk": (k.grad, k64.grad), "dv": (v.grad, v64.grad)}
    if dtype == torch.float64:
        for name, (got, want) in grads.items():
            assert rel_err(got.cpu(), want) < 1e-10, name
    else:  # bf16: judged against torch's own bf16 attention's gradient error
        qb, kb, vb = (t.detach().cpu().requires_grad_() for t in (q, k, v))
        dense(qb, kb, vb, LENGTHS).backward(grad_out.to(dtype))
        theirs = {"dq": qb.grad, "dk": kb.grad, "dv": vb.grad}
        for name, (got, want) in grads.items():
            assert rel_err(got.cpu(), want) <= 2 * rel_err(theirs[name], want), name


def test_bf16_reference_is_as_accurate_as_torch_bf16():
    lengths = [37, 64, 1, 29]
    q, k, v = _qkv(4, 8, 2, 64, lengths=lengths)
    want = dense_reference(q, k, v, lengths)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    got = reference.varlen_attention(qb, kb, vb, _cu(lengths))
    torch_bf16 = dense(qb, kb, vb, lengths)  # torch's own bf16 attention: every op in bf16
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 2 * rel_err(torch_bf16, want)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset is Linux-only (CI runs Linux)")
@pytest.mark.parametrize("path", ["reference", "op"])
def test_reference_memory_is_linear_in_the_sample_length(path):
    """One 4,096-token sample, 4 heads, forward and backward: the math path would keep 4 x 4096^2
    fp32 scores (256 MiB, twice in backward); the CPU flash kernel the reference reaches keeps O(L),
    and so does the op, whose backward recomputes one sample at a time (reference.varlen_attention_backward)."""
    g = torch.Generator().manual_seed(0)
    L = 4096
    q, k, v = (torch.randn(L, h, 32, generator=g).requires_grad_() for h in (4, 2, 2))
    cu = torch.tensor([0, L], dtype=torch.int32)
    fn = reference.varlen_attention if path == "reference" else attention._reference_op
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS (VmHWM)
    before = _rss_mib("VmRSS")
    fn(q, k, v, cu, None).sum().backward()
    grown = _rss_mib("VmHWM") - before
    assert grown < 64, f"{grown:.0f} MiB for one 4k-token sample: L x L scores were kept"


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def test_samples_do_not_see_each_other():
    q, k, v = _qkv(5)
    cu = _cu(LENGTHS)
    base = attention.varlen_attention(q, k, v, cu, max(LENGTHS))
    k2, v2 = k.clone(), v.clone()
    k2[6:23] += 1.0  # the 17-token sample's keys and values
    v2[6:23] -= 2.0
    changed = attention.varlen_attention(q, k2, v2, cu, max(LENGTHS))
    outside = torch.ones(sum(LENGTHS), dtype=torch.bool)
    outside[6:23] = False
    assert torch.equal(changed[outside], base[outside])
    assert not torch.allclose(changed[6:23], base[6:23])


def test_all_empty_stream_and_empty_samples():
    q, k, v = (torch.zeros(0, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    out = attention.varlen_attention(q, k, v, torch.tensor([0, 0, 0], dtype=torch.int32), 0)
    assert out.shape == (0, 4, 8)


@pytest.mark.parametrize(
    "shapes, cu_dtype, match",
    [
        (((37, 6, 16), (37, 2, 16), (37, 2, 16)), torch.int64, "int32"),
        (((37, 6, 16), (37, 4, 16), (37, 4, 16)), torch.int32, "multiple"),
        (((37, 6, 16), (36, 2, 16), (36, 2, 16)), torch.int32, "disagree"),
        (((37, 6, 16), (37, 2, 8), (37, 2, 8)), torch.int32, "disagree"),
        (((37, 96), (37, 2, 16), (37, 2, 16)), torch.int32, r"expected q \[T, Hq, D\]"),
        (((37, 6, 16), (37, 2, 16), (37, 1, 16)), torch.int32, r"expected q \[T, Hq, D\]"),
    ],
)
def test_bad_inputs_are_named(shapes, cu_dtype, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention.varlen_attention(q, k, v, _cu(LENGTHS).to(cu_dtype), max(LENGTHS))


def test_mixed_dtypes_are_named():
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match="q, k, v must share a dtype; got torch.float64, torch.float64, torch.float32"):
        attention.varlen_attention(q, k, v.float(), _cu(LENGTHS), max(LENGTHS))


@pytest.fixture
def fresh_selection(monkeypatch):
    monkeypatch.delenv("ATTENTION_BACKEND", raising=False)
    dispatch._attention.clear()
    yield monkeypatch
    dispatch._attention.clear()


def test_cpu_selects_reference_and_logs_it(fresh_selection, caplog):
    with caplog.at_level(logging.INFO, logger="limo.kernels"):
        assert dispatch.attention_backend("cpu") == "reference"
    assert "varlen attention on cpu for torch.bfloat16: reference" in caplog.text


def test_cuda_preference_order_follows_what_is_installed(fresh_selection):
    """Decided without touching a GPU: flash when installed, else torch varlen, else reference."""
    flash = dispatch.attention_unavailable("flash", "cuda")
    varlen = dispatch.attention_unavailable("torch_varlen", "cuda")
    want = "flash" if flash is None else "torch_varlen" if varlen is None else "reference"
    assert dispatch.attention_backend("cuda") == want
    if flash is not None:
        assert "flash-attn" in flash


def test_full_precision_on_cuda_selects_reference(fresh_selection):
    """The fused kernels take fp16/bf16 only: fp32 and fp64 (exactness runs) use the reference."""
    assert dispatch.attention_backend("cuda", torch.float32) == "reference"
    assert dispatch.attention_backend("cuda", torch.float64) == "reference"
    fresh_selection.setenv("ATTENTION_BACKEND", "torch_varlen")
    dispatch._attention.clear()
    with pytest.raises(RuntimeError, match="torch_varlen needs float16 or bfloat16 inputs, got torch.float32"):
        dispatch.attention_backend("cuda", torch.float32)


@pytest.mark.parametrize("name", ["flash", "torch_varlen"])
def test_named_backend_that_cannot_run_raises(fresh_selection, name):
    fresh_selection.setenv("ATTENTION_BACKEND", name)
    with pytest.raises(RuntimeError, match=f"ATTENTION_BACKEND={name} cannot run: {name} needs a CUDA device"):
        dispatch.attention_backend("cpu")


def test_unknown_backend_name_lists_the_allowed(fresh_selection):
    fresh_selection.setenv("ATTENTION_BACKEND", "xformers")
    with pytest.raises(ValueError, match="ATTENTION_BACKEND='xformers'; allowed: flash, torch_varlen, reference"):
        dispatch.attention_backend("cpu")


def test_model_attention_goes_through_varlen_attention(monkeypatch):
    """The model's packed forward calls kernels.varlen_attention once per layer with the stream's bounds."""
    from limo.model.qwen2 import ModelArgs, build_model

    calls = []
    real = attention.varlen_attention

    def spy(q, k, v, cu_seqlens, max_seqlen, scale=None):
        calls.append((cu_seqlens.tolist(), max_seqlen))
        return real(q, k, v, cu_seqlens, max_seqlen, scale)

    monkeypatch.setattr("limo.kernels.varlen_attention", spy)
    args = ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=2)
    model = build_model(args, device="cpu")
    init_weights(model)
    model(torch.arange(37) % 50, cu_seqlens=_cu(LENGTHS), max_seqlen=17)
    assert calls == [([0, 5, 6, 6, 23, 37], 17)] * 3


def test_reference_op_passes_torch_library_opcheck():
    """Schema, fake implementations (also with dynamic shapes) and autograd registration, as torch checks them."""
    q, k, v = (t.requires_grad_() for t in _qkv(7, dtype=torch.float32))
    torch.library.opcheck(torch.ops.limo.varlen_attention_reference.default, (q, k, v, _cu(LENGTHS), 0.3))


def test_reference_runs_on_fake_tensors_without_reading_bounds():
    """The per-sample reference reads cu_seqlens on the host; as an op its fake implementation
    answers instead, forward and backward, so FakeTensorMode runs the CPU path too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(16384, h, 128, requires_grad=True) for h in (40, 8, 8))
        cu = torch.zeros(9, dtype=torch.int32)
        out = attention.varlen_attention(q, k, v, cu, 4096)
        out.sum().backward()
        assert out.shape == q.shape and q.grad.shape == q.shape and k.grad.shape == k.shape


def test_fake_gpu_tensors_take_a_fused_backend(fresh_selection):
    """bf16 on the GPU path: flash-attn when installed, else torch's varlen_attn (both ops with fake
    implementations), never the per-sample reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.fake_gpu import fake_gpu

    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with fake_gpu() as device:
        q, k, v = (torch.empty(16384, h, 128, device=device, dtype=torch.bfloat16, requires_grad=True) for h in (28, 4, 4))
        cu = torch.zeros(9, device=device, dtype=torch.int32)
        with Ops():
            out = attention.varlen_attention(q, k, v, cu, 4096)
            out.sum().backward()
        assert out.shape == q.shape and k.grad.shape == k.shape
    assert dispatch.attention_backend("cuda") in ("flash", "torch_varlen")
    assert not any("limo" in op for op in seen) and any("varlen" in op for op in seen), seen
