"""Memory the CPU path makes, seen op by op: the checks that a path never materialises what it
avoids (the fused cross-entropy's [T, V] logits), for the CI profile (regression.py) and the tests.
A GPU run measures its own peaks with the allocator (harness.peak_extra_bytes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Within the mode, `peak` is the most bytes that the outputs for which `select(t)` holds kept
    alive at once: the CPU-side check that a path never materialises what it avoids (the logits,
    say), op by op as a dispatch mode sees them (a custom op whole, so run its implementation).

    Storages are tracked by weak reference, not tensors: autograd may keep a saved tensor's storage
    after the Python tensor is gone, and views share one storage, counted once."""

    def __init__(self, select: Callable[[torch.Tensor], bool]):
        super().__init__()
        self.select = select
        self.peak = 0
        self._live: dict[int, tuple[Any, int]] = {}  # address -> (storage weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr, (ref, _) in list(self._live.items()):  # first: a new storage may reuse a freed address
            if torch.UntypedStorage._expired(ref):
                torch.UntypedStorage._free_weak_ref(self._live.pop(ptr)[0])
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.select(t):
                storage = t.untyped_storage()
                self._live.setdefault(storage.data_ptr(), (storage._weak_ref(), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self._live.values()))
        return out

    def __exit__(self, *exc):
        for ref, _ in self._live.values():
            torch.UntypedStorage._free_weak_ref(ref)
        self._live.clear()
        return super().__exit__(*exc)
