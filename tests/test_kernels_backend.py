"""Backend selection in limo/kernels/dispatch.py: explicit, decided once, logged, never a silent fallback; fake tensors take their device's path."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from limo import kernels
from limo.kernels import dispatch, reference
from limo.kernels.triton_common import interpreting


@pytest.fixture(autouse=True)
def restore_backend(monkeypatch):
    """Each test starts from the process's setting and leaves it as it found it."""
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    setting, resolved = dict(dispatch._setting), dict(dispatch._resolved)
    yield
    dispatch._setting.clear(), dispatch._setting.update(setting)
    dispatch._resolved.clear(), dispatch._resolved.update(resolved)


def _norm_inputs():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(37, 48, generator=g), torch.randn(37, 48, generator=g)
    return x.requires_grad_(), r, torch.rand(48, generator=g) + 0.5


def test_auto_picks_triton_where_it_runs():
    kernels.set_backend("auto")
    assert kernels.backend("cpu") == ("triton" if interpreting() else "torch")
    if torch.cuda.is_available():
        assert kernels.backend("cuda") == "triton"


def test_auto_without_the_interpreter_uses_torch_on_cpu_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with caplog.at_level(logging.INFO, logger="limo.kernels"):
        kernels.set_backend("auto")
        assert kernels.backend("cpu") == "torch"
        kernels.backend("cpu")
    lines = [r.getMessage() for r in caplog.records if "kernels on cpu" in r.getMessage()]
    assert lines == ["kernels on cpu: torch (set_backend=auto picks the torch references here, as intended: CPU tensors run Triton "
                     "kernels only in Triton's interpreter (TRITON_INTERPRET=1 before limo.kernels is imported; for checking numerics))"]


def test_torch_backend_runs_the_references_and_the_chunked_loss(monkeypatch):
    ce_module = kernels.cross_entropy
    real_twin = ce_module._loss_grad_torch
    kernels.set_backend("torch")
    x, r, w = _norm_inputs()
    y, s = kernels.rmsnorm(x, w, 1e-6, residual=r)
    want_y, want_s = reference.rmsnorm(x, w, 1e-6, residual=r)
    assert torch.equal(y, want_y) and torch.equal(s, want_s)
    assert "limo" not in type(y.grad_fn).__name__
    targets = torch.randint(0, 48, (37,), generator=torch.Generator().manual_seed(1))
    launched = []
    monkeypatch.setattr(ce_module, "_loss_grad_torch", lambda *a: launched.append(1) or real_twin(*a))
    loss = kernels.fused_linear_cross_entropy(x, torch.eye(48), targets)
    assert launched, "the torch backend's loss is the chunked twin of the kernel, never the [T, V] reference"
    assert torch.allclose(loss, reference.fused_linear_cross_entropy(x, torch.eye(48), targets), rtol=1e-6)


def test_triton_backend_runs_our_ops():
    """CUDA, or the interpreter that tests/conftest.py turns on without CUDA."""
    kernels.set_backend("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, r, w = (t.detach().to(device) for t in _norm_inputs())
    y, _ = kernels.rmsnorm(x.requires_grad_(), w, 1e-6, residual=r)
    assert "limo_rmsnorm_residual" in type(y.grad_fn).__name__
    targets = torch.randint(0, 48, (37,), device=device)
    loss = kernels.fused_linear_cross_entropy(x, torch.eye(48, device=device), targets)
    assert "limo_linear_cross_entropy" in type(loss.grad_fn).__name__


def test_environment_overrides_the_config(monkeypatch, caplog):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    with caplog.at_level(logging.INFO, logger="limo.kernels"):
        assert kernels.set_backend("triton") == "torch"
    assert any("(KERNELS_BACKEND=torch)" in r.getMessage() for r in caplog.records)


def test_first_use_without_set_backend_honours_the_environment(monkeypatch):
    dispatch._setting.clear(), dispatch._resolved.clear()
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    assert kernels.backend("cpu") == "torch"


def test_a_named_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"'triton' \(from set_backend\) cannot run on cpu: CPU tensors run Triton kernels only in Triton's interpreter"):
        kernels.set_backend("triton")
        kernels.backend("cpu")  # reached on a CUDA machine, where set_backend checked CUDA


def test_a_device_without_a_triton_path_raises_when_triton_is_named(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    kernels.set_backend("auto")
    with pytest.raises(RuntimeError, match=r"'triton' \(from KERNELS_BACKEND\) cannot run on mps: no Triton path for mps tensors"):
        kernels.backend("mps")


def test_unknown_names_list_the_allowed_ones(monkeypatch):
    with pytest.raises(ValueError, match=r"set_backend='cuda' is not a kernel backend; allowed: auto, triton, torch"):
        kernels.set_backend("cuda")
    monkeypatch.setenv("KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"KERNELS_BACKEND='fast' is not a kernel backend"):
        kernels.set_backend("auto")


def test_no_name_is_both_a_submodule_and_a_function():
    """Every kernels submodule imported, each package attribute of a submodule's name is that module."""
    import importlib
    import pkgutil
    import types

    names = [m.name for m in pkgutil.iter_modules(kernels.__path__)]
    for name in names:
        importlib.import_module(f"limo.kernels.{name}")  # importing must not rebind a function's name
    for name in names:
        assert isinstance(getattr(kernels, name), types.ModuleType), name
    for name in kernels.__all__:
        assert name not in names and callable(getattr(kernels, name)) or name == "BACKENDS", name


def test_fake_cuda_tensors_resolve_to_the_gpu_path_without_running(caplog):
    """No CUDA here (or there is): a fake CUDA tensor gets what an H100 runs; a real query for CUDA
    on a machine without it still says why Triton cannot run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernels.set_backend("auto")
    with caplog.at_level(logging.INFO, logger="limo.kernels"), FakeTensorMode():
        x = torch.empty(4, 8, device="cuda")
        assert dispatch.kernel_backend(x) == "triton"
        assert dispatch.attention_backend(x.device.type, torch.bfloat16) in ("flash", "torch_varlen")
    assert "kernels on cuda (fake tensors, traced): triton (set_backend=auto)" in caplog.text
    if not torch.cuda.is_available():
        assert kernels.backend("cuda") == "torch"


def test_fake_cuda_tensors_follow_a_named_torch_backend(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    kernels.set_backend("auto")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert dispatch.kernel_backend(torch.empty(4, 8, device="cuda")) == "torch"


def test_value_less_tensors_stand_for_cuda_only_when_asked():
    """Meta tensors, and fake tensors of any device (the simulated training step's fake CPU
    parameters), take the CUDA path inside as_device("cuda"); real tensors keep their own."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernels.set_backend("auto")
    t = torch.empty(4, 8, device="meta")
    assert dispatch.kernel_backend(t) == "torch"  # no Triton path for meta tensors
    with dispatch.as_device("cuda"):
        assert dispatch.path_of(t) == ("cuda", True) and dispatch.kernel_backend(t) == "triton"
        assert dispatch.path_of(torch.empty(2)) == ("cpu", False)
        with FakeTensorMode():
            assert dispatch.path_of(torch.empty(2)) == ("cuda", True)
    assert dispatch.path_of(t) == ("meta", False)


def test_the_compile_constant_marker_is_the_one_torch_sets():
    """dispatch.constant_to_compile stands in for torch.compiler.assume_constant_result (which
    imports torch._dynamo): both must leave a function with the same marks."""

    def ours():
        return 1

    def torchs():
        return 1

    assert vars(dispatch.constant_to_compile(ours)) == vars(torch.compiler.assume_constant_result(torchs)) != {}
    assert dispatch.backend._dynamo_marked_constant and dispatch.attention_backend._dynamo_marked_constant


def test_the_kernels_and_the_cpu_sampler_start_without_torch_dynamo():
    """torch._dynamo costs ~2 s of every process's start-up: a process without a GPU that never
    compiles (a data tool, the sampler on a CPU) does not import it (with CUDA, importing the
    kernels reads torch varlen_attn's signature, which does; training imports it at FSDP2's first
    forward anyway). The process is made GPU-less here, so the check holds on a GPU machine too."""
    code = ("import sys; import limo.kernels, limo.eval.sampler, limo.data.inspect; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]", out
