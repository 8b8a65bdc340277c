"""pytest-benchmark entry points for kernel developers (not part of the default `pytest` run):

    pytest benchmarks/test_bench_kernels.py --benchmark-enable [-k rmsnorm] [--benchmark-compare]

On a GPU: one realistic case per op (Qwen2.5-32B widths, bf16); on CPU: the smoke cases, in
Triton's interpreter. For sweeps, ceilings and JSON use the bench_*.py scripts instead.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # before `kernels` defines its @triton.jit functions
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import bench_cross_entropy, bench_rmsnorm  # noqa: E402
from benchmarks.harness import Unavailable  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RMSNORM_CASE = dict(rows=16384, width=5120, dtype="bf16", residual=True) if DEVICE.type == "cuda" else bench_rmsnorm.SWEEPS["smoke"][1]
CE_CASE = dict(tokens=4096, hidden=5120, vocab=152064, dtype="bf16") if DEVICE.type == "cuda" else bench_cross_entropy.SWEEPS["smoke"][0]


def _bench(benchmark, build, case, mode):
    try:
        run = build(case, mode, DEVICE)
    except Unavailable as e:
        pytest.skip(str(e))

    def call():
        for t in run.grads:
            t.grad = None
        run.fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark reads a host clock

    benchmark(call)


@pytest.mark.parametrize("mode", bench_rmsnorm.MODES)
@pytest.mark.parametrize("provider", sorted(bench_rmsnorm.PROVIDERS))
def test_rmsnorm(benchmark, provider, mode):
    _bench(benchmark, bench_rmsnorm.PROVIDERS[provider], RMSNORM_CASE, mode)


@pytest.mark.parametrize("mode", bench_cross_entropy.MODES)
@pytest.mark.parametrize("provider", sorted(bench_cross_entropy.PROVIDERS))
def test_fused_linear_cross_entropy(benchmark, provider, mode):
    _bench(benchmark, bench_cross_entropy.PROVIDERS[provider], CE_CASE, mode)
