"""FakeTensorMode on the device whose tensors take the GPU path, for tests that trace what an H100 runs.

Fake CUDA tensors where torch is built with CUDA (the GPU machine). A CPU-only torch (the wheel CI
installs) cannot index fake CUDA tensors or differentiate through them (both ask for a CUDA device
guard only a CUDA build registers), so there meta tensors stand for CUDA (kernels.dispatch.as_device):
the dispatch, the ops and their fake implementations are the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from limo.kernels import dispatch

GPU_DEVICE = "cuda" if torch.backends.cuda.is_built() else "meta"


@contextlib.contextmanager
def fake_gpu() -> Iterator[torch.device]:
    """Yields the device to build fake tensors on; inside, they take the CUDA path and nothing runs."""
    with FakeTensorMode(), dispatch.as_device("cuda"):
        yield torch.device(GPU_DEVICE)
