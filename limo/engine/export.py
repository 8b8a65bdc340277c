"""The final Hugging Face export of the sharded model, refused when a weight is not finite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from limo.model.qwen2 import clean_name
from limo.model.weights import WeightsError, write_hf


def _full_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(model name, full tensor) one parameter at a time: an all-gather each, on every rank."""
    for name, p in model.named_parameters():
        yield clean_name(name), p.full_tensor() if isinstance(p, DTensor) else p


def _non_finite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or inf on any rank: each rank checks its own shards,
    one all-reduce, one host sync."""
    names, ok = [], []
    for name, p in model.named_parameters():
        names.append(clean_name(name))
        ok.append(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
    flags = torch.stack(ok).int()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [name for name, good in zip(names, flags.tolist()) if not good]  # host sync


def export_hf(
    model: torch.nn.Module,
    path: str | os.PathLike,
    rank: int,
    dtype: torch.dtype,
    tokenizer: Any = None,
    generation_config: str | os.PathLike | None = None,
) -> None:
    """Write the sharded model as a Hugging Face folder from rank 0, one tensor in memory at a time
    (with the base model's generation_config.json when given). Weights holding a NaN or inf are
    refused on every rank, naming the tensors, before anything is written."""
    bad = _non_finite(model)
    if bad:
        raise WeightsError(f"refusing to export {path}: {len(bad)} tensor(s) hold NaN or inf, first {', '.join(bad[:4])} "
                           "(the run diverged: resume from an earlier checkpoint with a lower optim.lr)")
    if rank == 0:
        write_hf(path, model.args, _full_tensors(model), dtype=dtype, tokenizer=tokenizer, generation_config=generation_config)
    else:
        for _ in _full_tensors(model):  # take part in every all-gather
            pass
    dist.barrier()

