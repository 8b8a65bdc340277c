"""benchmarks/harness.py kernel_choice: the Liger swap reaches the model and is undone; overrides are refused."""

from dataclasses import replace

import pytest
import torch

from limo import kernels
from benchmarks.bench_train_step import SWEEPS
from benchmarks.harness import kernel_choice
from limo.kernels import reference
from limo.kernels.triton_common import interpreting
from limo.model.init import init_weights
from limo.model.qwen2 import build_model


def test_the_liger_swap_reaches_the_model_and_is_undone(monkeypatch):
    """With a stand-in for Liger's ops, the model's norms and loss go through it; afterwards (even
    after an error) the engine's functions are back."""
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    calls = {"rmsnorm": 0, "flce": 0}

    def fake_liger(device):
        def rmsnorm(x, weight, eps, residual=None):
            calls["rmsnorm"] += 1
            return reference.rmsnorm(x, weight, eps, residual=residual)

        def flce(hidden, weight, targets, ignore_index=-100, reduction="sum", z_loss=0.0):
            calls["flce"] += 1
            return reference.fused_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, z_loss)

        return rmsnorm, flce

    original = kernels.rmsnorm, kernels.fused_linear_cross_entropy
    model = build_model(replace(SWEEPS["smoke"].args, num_layers=2), device="cpu")
    init_weights(model)
    ids = torch.randint(0, 203, (37,))
    with kernel_choice("liger", torch.device("cpu"), liger=fake_liger):
        model(ids, labels=ids)
    assert calls == {"rmsnorm": 2 * 2 + 1, "flce": 1}
    assert (kernels.rmsnorm, kernels.fused_linear_cross_entropy) == original  # nothing patched
    with pytest.raises(RuntimeError, match="boom"), kernel_choice("liger", torch.device("cpu"), liger=fake_liger):
        raise RuntimeError("boom")
    model(ids, labels=ids)
    assert calls == {"rmsnorm": 2 * 2 + 1, "flce": 1}  # the engine's kernels again


def test_a_kernels_override_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    with pytest.raises(RuntimeError, match="KERNELS_BACKEND=torch is set and would override"):
        with kernel_choice("triton", torch.device("cpu")):
            pass


def test_a_named_backend_holds_inside_and_auto_comes_back(monkeypatch):
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    with kernel_choice("torch", torch.device("cpu")):
        assert kernels.backend("cpu") == "torch"
    assert kernels.backend("cpu") == ("triton" if interpreting() else "torch")  # auto again


def test_liger_on_cpu_is_unavailable_not_an_error():
    from benchmarks.harness import Unavailable

    with pytest.raises(Unavailable, match="Liger's kernels run on CUDA only"), kernel_choice("liger", torch.device("cpu")):
        pass
