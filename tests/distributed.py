"""Run a test function on N CPU processes joined by gloo, the way torchrun starts them.

As under torchrun, the rendezvous store lives in the launching process, not in rank 0: a rank 0
that finishes first must not take the store away from ranks still tearing down (gloo aborts).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.multiprocessing as mp
from torch.distributed import TCPStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.distributed as dist

    try:
        fn(rank, world, *args)
        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` spawned processes; any failure fails the caller."""
    port = _free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=5))
    try:
        mp.start_processes(_entry, args=(world, port, fn, args), nprocs=world, start_method="spawn")
    finally:
        del store
