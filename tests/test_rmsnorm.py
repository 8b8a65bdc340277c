"""limo/kernels/norm.py (Triton ops; the interpreter on CPU) against float64 references: values and every gradient."""

import pytest
import torch

from limo import kernels
from limo.kernels import norm, reference
from limo.kernels.norm import MAX_WIDTH, rmsnorm, rmsnorm_bwd, rmsnorm_fwd
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def norm_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64: the rounding-error measure for half precision, where
    the max-element error of two correct implementations differs by chance by ~15%."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def _inputs(shape, dtype, residual, seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    r = torch.randn(shape, generator=g, dtype=torch.float64) if residual else None
    w = torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    ds = torch.randn(shape, generator=g, dtype=torch.float64) if residual else None
    cast = lambda t, dt=dtype: None if t is None else t.to(DEVICE, dt)  # noqa: E731
    return cast(x), cast(r), cast(w, w_dtype or dtype), cast(dy, torch.promote_types(dtype, w_dtype or dtype)), cast(ds)


def _run(fn, x, r, w, dy, ds, eps=1e-6):
    """Outputs and the gradients of x, residual, weight for loss = <y, dy> (+ <s, ds>)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w)]
    x, r, w = leaves
    out = fn(x, w, eps, residual=r)
    y, s = out if r is not None else (out, None)
    loss = (y.double() * dy.double()).sum()
    if ds is not None:
        loss = loss + (s.double() * ds.double()).sum()
    loss.backward()
    return [y, s] + [t.grad if t is not None else None for t in leaves]


def _pairs(got, want):
    names = ("y", "s", "dx", "dresidual", "dweight")
    return [(n, g, w) for n, g, w in zip(names, got, want) if w is not None]


@pytest.mark.parametrize("shape", [(37, 1003), (2, 3, 48), (300, 129)], ids=["37x1003", "2x3x48", "300x129-multi-program"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_float64_reference(shape, residual, dtype):
    """fp64 through the kernels checks the algebra exactly; fp32 checks fp32 statistics."""
    x, r, w, dy, ds = _inputs(shape, dtype, residual)
    got = _run(rmsnorm, x, r, w, dy, ds)
    want = _run(reference.rmsnorm, *(t.double() if t is not None else None for t in (x, r, w, dy, ds)))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, g, wnt in _pairs(got, want):
        assert g.dtype == dtype and g.shape == wnt.shape, name
        assert rel_err(g, wnt) < tol, (name, rel_err(g, wnt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_half_precision_error_no_worse_than_torch(dtype, residual):
    """Judged against torch's own path in that dtype: both compared with float64 on the same inputs."""
    x, r, w, dy, ds = _inputs((37, 1003), dtype, residual, seed=1)
    ours = _run(rmsnorm, x, r, w, dy, ds)
    theirs = _run(reference.rmsnorm, x, r, w, dy, ds)  # torch eager in `dtype`, fp32 statistics
    exact = _run(reference.rmsnorm, *(t.double() if t is not None else None for t in (x, r, w, dy, ds)))
    for (name, o, e), (_, t, _) in zip(_pairs(ours, exact), _pairs(theirs, exact)):
        assert o.dtype == dtype, name
        assert norm_err(o, e) <= 1.05 * norm_err(t, e), (name, norm_err(o, e), norm_err(t, e))


def test_weight_dtype_promotes_like_qwen2rmsnorm():
    """bf16 activations with an fp32 weight give an fp32 output, exactly as weight * x_hat.to(bf16)."""
    x, _, w, dy, _ = _inputs((37, 64), torch.bfloat16, False, seed=2, w_dtype=torch.float32)
    got = _run(rmsnorm, x, None, w, dy, None)
    theirs = _run(reference.rmsnorm, x, None, w, dy, None)
    exact = _run(reference.rmsnorm, x.double(), None, w.double(), dy.double(), None)
    assert got[0].dtype == torch.float32 and got[4].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    for (name, o, e), (_, t, _) in zip(_pairs(got, exact), _pairs(theirs, exact)):
        assert norm_err(o, e) <= 1.05 * norm_err(t, e), (name, norm_err(o, e), norm_err(t, e))


def test_wide_rows_16k():
    x, r, w, dy, ds = _inputs((3, 16384), torch.float32, True, seed=3)
    got = _run(rmsnorm, x, r, w, dy, ds)
    want = _run(reference.rmsnorm, *(t.double() for t in (x, r, w, dy, ds)))
    for name, g, wnt in _pairs(got, want):
        assert rel_err(g, wnt) < 2e-6, name


@pytest.mark.parametrize("which", ["y", "s"])
def test_only_one_output_receives_a_gradient(which):
    x, r, w, dy, ds = _inputs((37, 100), torch.float64, True, seed=4)
    results = []
    for fn in (rmsnorm, reference.rmsnorm):
        xl, rl, wl = (t.clone().requires_grad_() for t in (x, r, w))
        y, s = fn(xl, wl, 1e-6, residual=rl)
        ((y * dy).sum() if which == "y" else (s * ds).sum()).backward()
        results.append((xl.grad, rl.grad, wl.grad))
    (gx, gr, gw), (wx, wr, ww) = results
    assert rel_err(gx, wx) < 1e-12 and rel_err(gr, wr) < 1e-12
    if which == "y":
        assert rel_err(gw, ww) < 1e-12
    else:
        assert gw is None or torch.count_nonzero(gw) == 0


def test_leaf_gradients_accumulate_separately():
    """x and residual get the same gradient tensor from backward; accumulating twice must not alias them."""
    x, r, w, dy, _ = _inputs((37, 64), torch.float64, True, seed=5)
    x.requires_grad_(), r.requires_grad_()
    for _ in range(2):
        y, _ = rmsnorm(x, w, 1e-6, residual=r)
        (y * dy).sum().backward()
    xr, rr = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    (reference.rmsnorm(xr, w, 1e-6, residual=rr)[0] * dy).sum().backward()
    assert rel_err(x.grad, 2 * xr.grad) < 1e-12 and rel_err(r.grad, 2 * rr.grad) < 1e-12


def test_empty_input():
    x = torch.empty(0, 64, device=DEVICE, requires_grad=True)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    y = rmsnorm(x, w, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros(64, device=DEVICE))


def test_public_op_runs_the_triton_kernels(monkeypatch):
    """kernels.rmsnorm, under the default backend here, launches our forward and backward kernels."""
    launched = []
    for name in ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel"):
        real = getattr(norm, name)
        monkeypatch.setattr(norm, name, _Spy(real, name, launched))
    x, r, w, dy, ds = _inputs((37, 48), torch.float32, True, seed=6)
    got = _run(kernels.rmsnorm, x, r, w, dy, ds)
    assert kernels.backend(x.device.type) == "triton"
    assert launched == ["_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel"]
    want = _run(reference.rmsnorm, *(t.double() for t in (x, r, w, dy, ds)))
    assert all(rel_err(g, wnt) < 2e-6 for _, g, wnt in _pairs(got, want))


class _Spy:
    """Stands in for a @triton.jit kernel and records each launch."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_contract_errors_name_the_tensor():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \[..., N\] and weight \[N\].*\(4, 8\).*\(9,\)"):
        rmsnorm_fwd(x, torch.ones(9, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        rmsnorm_fwd(x, torch.ones(8, device=DEVICE), 1e-6, residual=x.double())
    with pytest.raises(TypeError, match="torch.int64"):
        rmsnorm_fwd(x.long(), torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match=f"width {MAX_WIDTH + 1} > {MAX_WIDTH}"):
        rmsnorm_fwd(torch.randn(1, MAX_WIDTH + 1, device=DEVICE), torch.ones(MAX_WIDTH + 1, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rmsnorm_fwd(x, torch.ones(8, device=DEVICE), -1.0)


def test_backward_without_weight_gradient_skips_it():
    x, _, w, dy, _ = _inputs((37, 64), torch.float32, False, seed=7)
    y, s, rstd = rmsnorm_fwd(x, w, 1e-6)
    dx, dw = rmsnorm_bwd(dy, None, s, w, rstd, need_dw=False)
    assert dw is None
    xl = x.double().requires_grad_()
    (reference.rmsnorm(xl, w.double(), 1e-6) * dy.double()).sum().backward()
    assert rel_err(dx, xl.grad) < 2e-6


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_ops_pass_torch_library_opcheck(residual):
    """Schema, fake implementation (also with dynamic shapes) and autograd registration, as torch checks them."""
    x, r, w, dy, ds = _inputs((5, 48), torch.float32, residual, seed=8)
    x.requires_grad_(), w.requires_grad_()
    if residual:
        torch.library.opcheck(torch.ops.limo.rmsnorm_residual.default, (x, r.requires_grad_(), w, 1e-6))
    else:
        torch.library.opcheck(torch.ops.limo.rmsnorm.default, (x, w, 1e-6))
    _, s, rstd = rmsnorm_fwd(x.detach(), w.detach(), 1e-6, r)
    torch.library.opcheck(torch.ops.limo.rmsnorm_backward.default, (dy, ds, s, w.detach(), rstd, True))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_backward_keeps_exactly_the_sum_weight_and_rstd(residual):
    """What autograd holds per norm is what the activation-memory plan counts: s (x itself without a
    residual, so nothing new), the weight and one fp32 rstd per row; never y or a copy of x."""
    x, r, w, _, _ = _inputs((37, 48), torch.bfloat16, residual, seed=9)
    x.requires_grad_()
    out = rmsnorm(x, w, 1e-6, residual=r)
    y, s = out if residual else (out, x)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 3
    assert saved[0].untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
    assert saved[1] is w or saved[1].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert saved[2].dtype == torch.float32 and saved[2].shape == (37,)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fake_tensors_give_shapes_and_gradients_without_running(residual):
    """Under FakeTensorMode the ops' fake implementations answer, forward and backward; no kernel launches."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 3, 896, dtype=torch.bfloat16, requires_grad=True)
        r = torch.empty(7, 3, 896, dtype=torch.bfloat16, requires_grad=True) if residual else None
        w = torch.empty(896, dtype=torch.bfloat16, requires_grad=True)
        out = rmsnorm(x, w, 1e-6, residual=r)
        y = out[0] if residual else out
        y.sum().backward()
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        assert x.grad.shape == x.shape and w.grad.shape == w.shape and (r is None or r.grad.shape == r.shape)
        with pytest.raises(ValueError, match=r"x \[..., N\] and weight \[N\]"):
            rmsnorm(x, w[:5], 1e-6)


def test_kernels_build_for_hopper_with_16_byte_accesses_and_no_spills():
    """No GPU needed: Triton's own ptxas compiles both kernels for sm_90 at every tile the host
    picks for bf16 rows of Qwen2.5's widths (limo/kernels/compile_check.py's configurations)."""
    from tests.test_compile_check import compile_in_subprocess

    rows = compile_in_subprocess(90, ("rmsnorm_fwd", "rmsnorm_bwd"), pointers=[["bf16", "fp32"]])
    assert len(rows) == 20  # 4 tiles x (2 forwards + 3 backwards)
    for r in rows:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r  # no spills to local memory
        assert "ld.global.v4.b32" in r["loads"] and "st.global.v4.b32" in r["stores"], r  # 16-byte accesses
        assert not any(op.endswith(".b16") for op in r["loads"] + r["stores"]), r  # no element-wise bf16 access
