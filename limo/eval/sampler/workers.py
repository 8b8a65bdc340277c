"""The process group behind `LLM(..., tensor_parallel_size=T)`: one scheduler, T model ranks.

Rank 0 lives in the caller's process and owns everything but a model shard's share of the work:
the scheduler, the block manager, the sampler. Ranks 1..T-1 are worker processes (spawned) that
load their shard, build the same paged cache, and then loop: receive a step's host inputs
(runner.StepInputs, broadcast by rank 0 over a gloo group as two int64 tensors), run it, wait
for the next. The model's
own collectives (two all-reduces per layer, the embedding's, the head's gather) go over the default
group: NCCL on GPUs (rank r on cuda:r of the devices visible), gloo on CPU.

A worker that dies (killed, out of memory) surfaces as WorkerDied naming its rank, pid and exit
code: rank 0 checks the workers before each step, and a collective that fails because a peer is
gone is re-raised that way (gloo notices a closed socket at once: tested on CPU). On GPUs a worker
that dies inside a step leaves rank 0 waiting in NCCL until the group's timeout
(LIMO_TP_TIMEOUT_S, default 300 s), after which PyTorch's NCCL watchdog aborts the process:
bounded, but without the WorkerDied message (not yet run on a GPU). After any failure of a step
the group is closed: its ranks may be between two collectives, so it cannot run another.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from limo.eval.sampler.parallel import TPLayout, load_shard
from limo.eval.sampler.runner import ModelRunner, StepInputs
from limo.model.weights import HFCheckpoint

log = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A tensor-parallel worker process ended while the group still needed it."""


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("LIMO_TP_TIMEOUT_S", "300")))


def _join(rank: int, size: int, init_file: str, device: torch.device) -> dist.ProcessGroup:
    """Join the group; the gloo group that carries the steps (the default one on CPU)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=size, timeout=_timeout(), **kw)
    return dist.new_group(backend="gloo", timeout=_timeout()) if backend == "nccl" else dist.group.WORLD


def _rank_device(device_type: str, rank: int) -> torch.device:
    if device_type != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    return device


# A step travels as two int64 tensors over the gloo group: a header of field lengths, then every
# field flattened into one payload. Pickling it (broadcast_object_list) cost rank 0 ~1.7 ms per
# decode step at batch 256 on a CPU core, as much as the rest of its host work.
_FIELDS = ("table_updates", "copies", "ids", "positions", "slots", "cu", "logit_rows", "lens", "rows")
_WIDTH = {"table_updates": 3, "copies": 2}
_HEADER = 2 + len(_FIELDS)  # [kind (0 decode, 1 prefill, -1 stop), fields present (bits), lengths...]


def send_step(step: StepInputs | None, group: dist.ProcessGroup) -> None:
    if step is None:
        dist.broadcast(torch.tensor([-1] + [0] * (_HEADER - 1)), src=0, group=group)
        return
    flat: list[int] = []
    header = [int(step.prefill), 0]
    for bit, name in enumerate(_FIELDS):
        value = getattr(step, name)
        if value is None:
            header.append(0)
            continue
        header[1] |= 1 << bit
        if name in _WIDTH:
            flat.extend(x for item in value for x in item)
        else:
            flat.extend(value)
        header.append(len(value))
    dist.broadcast(torch.tensor(header), src=0, group=group)
    if flat:
        dist.broadcast(torch.tensor(flat, dtype=torch.int64), src=0, group=group)


def recv_step(group: dist.ProcessGroup) -> StepInputs | None:
    header = torch.empty(_HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    kind, present, *lengths = header.tolist()
    if kind == -1:
        return None
    total = sum(n * _WIDTH.get(name, 1) for name, n in zip(_FIELDS, lengths))
    payload = torch.empty(total, dtype=torch.int64)
    if total:
        dist.broadcast(payload, src=0, group=group)
    flat, at, fields = payload.tolist(), 0, {}
    for bit, (name, n) in enumerate(zip(_FIELDS, lengths)):
        if not present >> bit & 1:
            fields[name] = None
            continue
        width = _WIDTH.get(name, 1)
        chunk = flat[at:at + n * width]
        at += n * width
        fields[name] = [tuple(chunk[i:i + width]) for i in range(0, len(chunk), width)] if width > 1 else chunk
    return StepInputs(prefill=bool(kind), **fields)


def _worker_main(rank: int, size: int, init_file: str, model_dir: str, dtype: torch.dtype, device_type: str,
                 runner_kwargs: dict[str, Any], threads: int) -> None:  # fmt: skip
    if device_type == "cpu":
        torch.set_num_threads(threads)
    device = _rank_device(device_type, rank)
    control = _join(rank, size, init_file, device)
    args = HFCheckpoint(model_dir).args
    model = load_shard(model_dir, TPLayout(args, rank, size), dtype, device).eval()
    runner = ModelRunner(model, **runner_kwargs, control_group=control)
    while (step := recv_step(control)) is not None:
        runner.execute(step)
    dist.destroy_process_group()


class TensorParallelGroup:
    """Rank 0's side of the group: starts the workers, loads its own shard, broadcasts steps."""

    def __init__(self, size: int, model_dir: str, dtype: torch.dtype, device: torch.device, runner_kwargs: dict[str, Any]):
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size > 1 starts its own process group; this process is already in one "
                               "(torchrun?): run the sampler in a process of its own")  # fmt: skip
        if device.type == "cuda" and device.index not in (None, 0):
            raise ValueError(f"tensor_parallel_size={size} uses cuda:0..{size - 1} of the GPUs visible; got device {device}: "
                             "choose the GPUs with CUDA_VISIBLE_DEVICES instead")  # fmt: skip
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; {torch.cuda.device_count()} are visible")
        self.size = size
        self._dir = tempfile.mkdtemp(prefix="limo-tp-")
        init_file = os.path.join(self._dir, "rendezvous")
        threads = max(1, torch.get_num_threads() // size)
        ctx = mp.get_context("spawn")
        self.workers = [
            ctx.Process(target=_worker_main, name=f"limo-tp-rank{rank}", daemon=True,
                        args=(rank, size, init_file, model_dir, dtype, device.type, runner_kwargs, threads))
            for rank in range(1, size)
        ]  # fmt: skip
        for w in self.workers:
            w.start()
        self._closed = False
        self.control = None
        try:
            self.device = _rank_device(device.type, 0)
            self.control = _join(0, size, init_file, self.device)
            args = HFCheckpoint(model_dir).args
            self.model = load_shard(model_dir, TPLayout(args, 0, size), dtype, self.device).eval()
        except BaseException as e:
            self.close()
            self.raise_if_dead(e)
            raise

    def check(self) -> None:
        """WorkerDied for the first worker that is no longer running."""
        for rank, w in enumerate(self.workers, 1):
            if not w.is_alive():
                raise WorkerDied(f"tensor-parallel worker rank {rank} of {self.size} (pid {w.pid}) died with exit code {w.exitcode}")

    def raise_if_dead(self, cause: BaseException) -> None:
        """After a failure: if a worker is gone, that is the error to report (waits briefly for it)."""
        deadline = time.monotonic() + 2.0  # one short wait in all, for a worker that is dying
        while time.monotonic() < deadline and all(w.is_alive() for w in self.workers):
            time.sleep(0.05)
        try:
            self.check()
        except WorkerDied as died:
            raise died from cause

    def broadcast(self, step: StepInputs) -> None:
        if self._closed:
            raise RuntimeError("this LLM's tensor-parallel group was closed (after a failed step, or by close()): make a new LLM")
        self.check()
        send_step(step, self.control)

    def close(self, abort: bool = False) -> None:
        """Stop the workers (a None step), wait for them, leave the group. Idempotent. `abort`
        (after a failed step, when the workers may be inside a collective): kill them instead."""
        if self._closed:
            return
        self._closed = True
        if abort:
            for w in self.workers:
                if w.is_alive():
                    w.kill()
        if dist.is_initialized() and not abort:
            try:
                if self.control is not None and all(w.is_alive() for w in self.workers):
                    send_step(None, self.control)
            except RuntimeError as e:  # a dead peer: nothing left to tell
                log.info("tensor-parallel shutdown: %s", e)
        deadline = time.monotonic() + 30  # one wait for all of them, then whatever is left is killed
        for w in self.workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.is_alive():
                w.kill()
                w.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._dir, ignore_errors=True)
