"""The model's initial values: the one init rule, and each rank's shards filled by it or by a
Hugging Face checkpoint (materialisation).

The rule: RMSNorm weights are 1, biases 0, every other tensor normal(0, std). The normal draws
are seeded per (seed, parameter name, block of 1024 rows), so any range of rows comes out the
same whatever the world size, and a rank draws only the blocks it holds: 1 rank and N ranks
start from the same model, and no rank draws the whole model.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from limo.model.qwen2 import clean_name

ROWS_PER_DRAW = 1024


def init_kind(name: str) -> str:
    """"ones" (a norm's weight), "zeros" (a bias) or "normal": what the rule gives parameter `name`."""
    if name.endswith("norm.weight"):
        return "ones"
    return "zeros" if name.endswith(".bias") else "normal"


def initial_rows(name: str, shape: torch.Size, rows: slice, std: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows [rows] of parameter `name`'s initial value (fp32), by the rule above, drawn on `device`:
    the same values for the same device type (a GPU's generator differs from a CPU's), and a GPU
    draws a 32B model in seconds where a CPU takes minutes."""
    kind = init_kind(name)
    count = rows.stop - rows.start
    if kind != "normal":
        return (torch.ones if kind == "ones" else torch.zeros)((count, *shape[1:]), device=device)
    out = torch.empty((count, *shape[1:]), device=device)
    first, last = rows.start // ROWS_PER_DRAW, max(rows.start, rows.stop - 1) // ROWS_PER_DRAW
    for block in range(first, last + 1) if count else ():
        digest = hashlib.sha256(f"{seed}:{name}:{block}".encode()).digest()
        g = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))
        lo, hi = block * ROWS_PER_DRAW, min((block + 1) * ROWS_PER_DRAW, shape[0])
        drawn = torch.empty((hi - lo, *shape[1:]), device=device).normal_(0.0, std, generator=g)
        a, z = max(lo, rows.start), min(hi, rows.stop)
        out[a - rows.start : z - rows.start] = drawn[a - lo : z - lo]
    return out


def local_rows(param: torch.Tensor) -> slice:
    """Rows of dim 0 this rank holds: FSDP2 shards dim 0 in torch.chunk-sized pieces."""
    if not isinstance(param, DTensor):
        return slice(0, param.shape[0])
    start, stop = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(f"expected dim-0 sharding, got {placement}")
            n, idx = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
            chunk = -(-(stop - start) // n)
            start, stop = min(start + idx * chunk, stop), min(start + (idx + 1) * chunk, stop)
    return slice(start, stop)


@torch.no_grad()
def init_weights(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Fill an unsharded model in place by the rule (e.g. after `to_empty`)."""
    for name, param in model.named_parameters():  # a tied head is the embedding: named once
        param.copy_(initial_rows(clean_name(name), param.shape, slice(0, param.shape[0]), std, seed, param.device))


@torch.no_grad()
def materialize(model: Any, device: torch.device, checkpoint: Any = None, seed: int = 0, std: float = 0.02,
                cpu_offload: bool = False) -> None:  # fmt: skip
    """Allocate this rank's shards on `device` (in host memory under CPU offload, where FSDP2
    wants them) and fill them: from `checkpoint` (a model.weights.HFCheckpoint, read by row
    slices) or by the rule."""
    model.to_empty(device="cpu" if cpu_offload else device)
    model.tie_weights()
    if checkpoint is not None:
        checkpoint.validate()
    for raw_name, param in model.named_parameters():
        name = clean_name(raw_name)
        local = param.to_local() if isinstance(param, DTensor) else param
        rows = local_rows(param)
        if checkpoint is not None:
            value = checkpoint.read(name, rows=rows, dtype=local.dtype)
        else:
            value = initial_rows(name, param.shape, rows, std, seed, local.device)
        if value.shape != local.shape:
            raise RuntimeError(f"{name}: local shard {tuple(local.shape)} but read {tuple(value.shape)} for rows {rows}")
        local.copy_(value)
