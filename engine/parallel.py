"""Process groups, the device mesh, and the FSDP2 sharding plan, applied from outside the model.

Order (torchtitan's parallelize step): activation checkpointing -> torch.compile per block ->
`fully_shard` per decoder block -> `fully_shard([norm, lm_head])` -> `fully_shard(embed_tokens)`
-> `fully_shard(root)`. The model is built on the meta device; `materialize` then gives each
rank only its own shards, read from the HF safetensors row slices it owns or drawn from a
world-size-independent random init. No rank ever holds the whole model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from engine.config import ParallelConfig
from model.qwen2 import Qwen2, RMSNorm
from model.weights import HFCheckpoint

log = logging.getLogger(__name__)

# What checkpoint_wrapper inserts into parameter names (compile is applied in place: it adds nothing).
_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's index among data-parallel ranks (every rank is data-parallel here)."""
        return self.rank

    @contextmanager
    def node_leaders_first(self, timeout: timedelta = timedelta(hours=4)) -> Iterator[None]:
        """Run the body on each node's local rank 0 first, then on its other ranks: hub downloads
        happen once per node and the rest read the cache. The wait is a gloo barrier with a long
        timeout (a 65 GB download outlasts NCCL's default 10 minutes)."""
        group = dist.new_group(backend="gloo", timeout=timeout)
        try:
            if self.local_rank != 0:
                dist.barrier(group=group)
                yield
            else:
                try:
                    yield
                finally:  # a leader that failed lets the others go and fail with their own message
                    dist.barrier(group=group)
        finally:
            dist.destroy_process_group(group)

    def check_shared_folder(self, folder: Path) -> None:
        """Checkpoints are renamed by rank 0 alone: every rank must see the folder rank 0 sees."""
        folder.mkdir(parents=True, exist_ok=True)
        probe = [f".shared-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(probe, src=0)
        if self.rank == 0:
            (folder / probe[0]).touch()
        dist.barrier()
        seen = torch.tensor([int((folder / probe[0]).exists())], device=self.device)
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)  # returns once every rank has looked
        blind = int(seen.item()) == 0
        if self.rank == 0:
            (folder / probe[0]).unlink()
        if blind:
            raise RuntimeError(
                f"train.output_dir={folder} is not one folder for every rank (some rank, e.g. on another node, does not see "
                f"what rank 0 writes there): checkpoints need a filesystem all ranks share"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str, dp_replicate: int, cpu_offload: bool = False) -> Distributed:
    """Join (or, outside torchrun, create a one-process) group: NCCL on GPUs (plus gloo for host
    tensors under CPU offload), gloo on CPU."""
    if "RANK" not in os.environ:  # plain `python engine/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        # torchrun shows a process all of its node's GPUs; a launcher that shows each task one
        # (srun --gpus-per-task=1) numbers them from 0 in every process.
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # Under CPU offload the gradients clipped (and their norms reduced) live in host memory: gloo does those.
        backend = ("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return Distributed(rank, world, local_rank, dev, build_mesh(dev.type, world, dp_replicate))


def build_mesh(device_type: str, world: int, dp_replicate: int) -> DeviceMesh:
    """The data-parallel mesh: 1-D (dp_shard), or 2-D HSDP (dp_replicate x dp_shard) across nodes."""
    if world % dp_replicate:
        raise ValueError(f"parallel.dp_replicate={dp_replicate} does not divide the world size {world}")
    if dp_replicate > 1:
        return init_device_mesh(device_type, (dp_replicate, world // dp_replicate), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(device_type, (world,), mesh_dim_names=("dp_shard",))


def clean_name(name: str) -> str:
    """A parameter name as the model names it, without the checkpoint wrapper's fragment."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def parallelize(model: Qwen2, mesh: DeviceMesh, cfg: ParallelConfig, param_dtype: torch.dtype) -> Qwen2:
    """Apply checkpointing, compile and the FSDP2 plan in place; returns the same model.

    Gradients are reduced in fp32 and summed, not averaged: the loss is already divided by the
    global number of supervised tokens, so the sum over ranks is the gradient of the global mean.
    """
    if cfg.cpu_offload and mesh.device_type != "cuda":
        raise ValueError(f"parallel.cpu_offload=true moves sharded state from GPU to host memory: it needs CUDA devices, this run is on {mesh.device_type}")
    for i, layer in enumerate(model.layers):
        if cfg.activation_checkpointing == "full" or (cfg.activation_checkpointing == "selective" and i % 2 == 0):
            model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
        if cfg.compile:
            model.layers[i].compile()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload: OffloadPolicy = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
    shard = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **shard)
    if not model.args.tie_word_embeddings:
        # Backward starts with the head: keeping it gathered after forward saves one all-gather.
        fully_shard([model.norm, model.lm_head], reshard_after_forward=False, **shard)
        fully_shard(model.embed_tokens, reshard_after_forward=cfg.reshard_after_forward, **shard)
    # A tied embedding is one parameter used at both ends of the model: it stays in the root group.
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **shard)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: every backend has it (gloo lacks PREMUL_SUM)
    if cfg.prefetch:
        layers = list(model.layers)
        for i, layer in enumerate(layers):
            layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 1 + cfg.prefetch])
            layer.set_modules_to_backward_prefetch(layers[max(0, i - cfg.prefetch) : i][::-1])
    return model


def _local_rows(param: torch.Tensor) -> slice:
    """Rows of dim 0 this rank holds: FSDP2 shards dim 0 in torch.chunk-sized pieces."""
    if not isinstance(param, DTensor):
        return slice(0, param.shape[0])
    rows = param.shape[0]
    start, stop = 0, rows
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(f"expected dim-0 sharding, got {placement}")
            n, idx = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
            chunk = -(-(stop - start) // n)
            start, stop = min(start + idx * chunk, stop), min(start + (idx + 1) * chunk, stop)
    return slice(start, stop)


def _seeded_normal(name: str, shape: torch.Size, rows: slice, std: float, seed: int, block: int = 1024) -> torch.Tensor:
    """Rows [rows] of a normal(0, std) tensor that is the same whatever the world size.

    Each block of `block` rows has its own generator seeded from (seed, name, block index),
    so a rank draws only the blocks it overlaps.
    """
    out = torch.empty((rows.stop - rows.start, *shape[1:]))
    first, last = rows.start // block, max(rows.start, rows.stop - 1) // block
    for b in range(first, last + 1) if rows.stop > rows.start else ():
        digest = hashlib.sha256(f"{seed}:{name}:{b}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        lo, hi = b * block, min((b + 1) * block, shape[0])
        full = torch.empty((hi - lo, *shape[1:])).normal_(0.0, std, generator=g)
        a, z = max(lo, rows.start), min(hi, rows.stop)
        out[a - rows.start : z - rows.start] = full[a - lo : z - lo]
    return out


@torch.no_grad()
def materialize(
    model: Qwen2, device: torch.device, checkpoint: HFCheckpoint | None = None, seed: int = 0, std: float = 0.02, cpu_offload: bool = False
) -> None:
    """Allocate this rank's shards on `device` (in host memory under CPU offload, where FSDP2
    wants them) and fill them: from `checkpoint` or a seeded init."""
    model.to_empty(device="cpu" if cpu_offload else device)
    model.tie_weights()
    if checkpoint is not None:
        checkpoint.validate()
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for raw_name, param in model.named_parameters():
        name = clean_name(raw_name)
        local = param.to_local() if isinstance(param, DTensor) else param
        rows = _local_rows(param)
        if checkpoint is not None:
            value = checkpoint.read(name, rows=rows, dtype=local.dtype)
        elif id(param) in norms:
            value = torch.ones_like(local)
        elif name.endswith(".bias"):
            value = torch.zeros_like(local)
        else:
            value = _seeded_normal(name, param.shape, rows, std, seed)
        if value.shape != local.shape:
            raise RuntimeError(f"{name}: local shard {tuple(local.shape)} but read {tuple(value.shape)} for rows {rows}")
        local.copy_(value)
