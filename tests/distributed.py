"""Run a test function on N CPU processes joined by gloo, the way torchrun would start them."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.distributed as dist

    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` spawned processes; any failure fails the caller."""
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, start_method="spawn")
