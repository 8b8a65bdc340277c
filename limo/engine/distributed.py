"""Process groups and the device mesh: joining the job, and the ranks' shared concerns at start-up.

NCCL on GPUs (plus gloo for host tensors under CPU offload), gloo on CPU; a plain
`python limo/engine/train.py` creates a world of one. The mesh is 1-D (dp_shard), or 2-D HSDP
(dp_replicate x dp_shard) across nodes; context parallelism (parallel.cp) adds groups of cp
consecutive ranks that share a micro-batch's tokens (limo/engine/context.py), beside it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # FSDP's: every rank, cp ranks included (parameters are sharded over all of them)
    cp: int = 1
    cp_group: dist.ProcessGroup | None = None  # the ranks that share a micro-batch's tokens (parallel.cp > 1)

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def dp_rank(self) -> int:
        """This rank's place among the data-parallel ranks: a cp group reads one rank's data."""
        return self.rank // self.cp

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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


def check_world(world: int, dp_replicate: int, cp: int) -> None:
    """The layout must divide the world; checked before any process group starts."""
    if world % dp_replicate:
        raise ValueError(f"parallel.dp_replicate={dp_replicate} does not divide the world size {world}")
    if world % cp or (world // dp_replicate) % cp:
        raise ValueError(f"parallel.cp={cp} does not divide the world size {world} (or its {world // dp_replicate} ranks per replica)")


def init_distributed(device: str, dp_replicate: int, cpu_offload: bool = False, cp: int = 1) -> Distributed:
    """Join (or, outside torchrun, create a one-process) group: NCCL on GPUs (plus gloo for host
    tensors under CPU offload), gloo on CPU. With cp > 1, also the context-parallel groups: cp
    consecutive ranks each (on one node, where NVLink carries the per-layer all-gathers)."""
    # Plain `python limo/engine/train.py` (or a caller in its own process): a world of one, set up without
    # touching os.environ, so that no child process (the evaluation, a test's train.py) inherits a
    # rank and a rendezvous that are not its own.
    alone = "RANK" not in os.environ
    rank, world, local_rank = (0, 1, 0) if alone else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    check_world(world, dp_replicate, cp)
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
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None, store=_store(alone), rank=rank, world_size=world)
    mesh = build_mesh(dev.type, world, dp_replicate)
    cp_group = init_device_mesh(dev.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))["cp"].get_group() if cp > 1 else None
    return Distributed(rank, world, local_rank, dev, mesh, cp, cp_group)


def _store(alone: bool) -> dist.Store:
    """Where the ranks meet. A world of one keeps it in memory: no TCP port to pick, so none to
    lose to another process. Under torchrun, the launcher's store, its keys prefixed by the
    attempt: torchrun keeps one store across `--max-restarts` restarts, where the process groups
    of a restarted attempt would otherwise read the dead attempt's addresses and wait on them."""
    if alone:
        return dist.HashStore()
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://"))
    return dist.PrefixStore(f"limo/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def build_mesh(device_type: str, world: int, dp_replicate: int) -> DeviceMesh:
    """The data-parallel mesh: 1-D (dp_shard), or 2-D HSDP (dp_replicate x dp_shard) across nodes."""
    if world % dp_replicate:
        raise ValueError(f"parallel.dp_replicate={dp_replicate} does not divide the world size {world}")
    if dp_replicate > 1:
        return init_device_mesh(device_type, (dp_replicate, world // dp_replicate), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(device_type, (world,), mesh_dim_names=("dp_shard",))


# Object collectives that do nothing without a process group: one process, as in the unit tests.


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
