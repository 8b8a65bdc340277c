"""Data-parallel replicas: `eval.run --tp T --dp D` runs D samplers of T GPUs each, one process each.

ReplicaGenerator is a Generator (limo/eval/generators.py): it deals a batch's requests over the
replicas round-robin, each replica generates its share with its own LLM (tensor-parallel over its
T GPUs: replica r sees GPUs r*T .. r*T+T-1 as cuda:0..T-1), and every completion comes back to this
process as it finishes, so the harness writes it into the one output folder (and a resumed run
asks only for what is missing, as with one sampler). Every request carries its own seed, so which
replica draws a sample does not change it: D replicas give the outputs one does.

A replica that dies (or whose workers die) is an error naming it, its pid and its GPUs, raised
within POLL_S of the death; never a hang.
"""

from __future__ import annotations

import os
import queue
import time
import weakref
from typing import Any, Sequence

import torch.multiprocessing as mp

from limo.eval.generators import Completion, LLMGenerator, OnDone, Request

POLL_S = 1.0


class ReplicaDied(RuntimeError):
    """A data-parallel replica ended before it had generated its share."""


def _replica_main(index: int, devices: list[int] | None, model_dir: str, llm_kwargs: dict[str, Any], inbox: Any, outbox: Any) -> None:
    if devices is not None:  # before CUDA is initialised in this process; indices into what the parent sees
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = visible.split(",") if visible else [str(d) for d in range(max(devices) + 1)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical[d] for d in devices)
    from limo.eval.sampler import LLM

    try:
        with LLM(model_dir, **llm_kwargs) as llm:
            generate = LLMGenerator(llm, use_tqdm=False)
            outbox.put(("ready", index, None))
            while (job := inbox.get()) is not None:
                ids, requests = job
                if requests:
                    generate(requests, on_done=lambda i, c: outbox.put(("done", ids[i], c)))
                outbox.put(("idle", index, None))
    except BaseException as e:  # the parent names the replica and re-raises the cause
        outbox.put(("error", index, f"{type(e).__name__}: {e}"))
        raise


def _shutdown(inboxes: list[Any], procs: list[Any]) -> None:
    for inbox, p in zip(inboxes, procs):
        if p.is_alive():
            inbox.put(None)
    deadline = time.monotonic() + 30  # one wait for all of them, then whatever is left is killed
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


class ReplicaGenerator:
    """D replicas of LLM(model_dir, tensor_parallel_size=T, **llm_kwargs); see the module docstring."""

    def __init__(self, model_dir: str, replicas: int, tensor_parallel_size: int = 1, gpus: bool = False, **llm_kwargs: Any):
        if replicas < 1:
            raise ValueError(f"replicas={replicas} must be >= 1")
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(replicas)]
        T = tensor_parallel_size
        self.devices = [list(range(r * T, (r + 1) * T)) if gpus else None for r in range(replicas)]
        kwargs = dict(llm_kwargs, tensor_parallel_size=T)
        # Not daemonic: a replica starts its own tensor-parallel workers. Stopped by close(), at the
        # latest when this object is collected or the interpreter exits (weakref.finalize).
        self.procs = [ctx.Process(target=_replica_main, name=f"limo-replica{r}",
                                  args=(r, self.devices[r], model_dir, kwargs, self.inboxes[r], self.outbox))
                      for r in range(replicas)]  # fmt: skip
        for p in self.procs:
            p.start()
        self._finalizer = weakref.finalize(self, _shutdown, self.inboxes, self.procs)
        ready = 0
        while ready < replicas:
            kind, index, _ = self._next()
            ready += kind == "ready"

    def _describe(self, index: int) -> str:
        p, gpus = self.procs[index], self.devices[index]
        where = f"GPUs {','.join(map(str, gpus))}" if gpus is not None else "CPU"
        return f"data-parallel replica {index} of {len(self.procs)} (pid {p.pid}, {where})"

    def _next(self) -> tuple[str, Any, Any]:
        """The next message from a replica; ReplicaDied when one reported an error or is gone."""
        while True:
            try:
                kind, index, payload = self.outbox.get(timeout=POLL_S)
            except queue.Empty:
                for i, p in enumerate(self.procs):
                    if not p.is_alive():
                        self.close()
                        raise ReplicaDied(f"{self._describe(i)} died with exit code {p.exitcode}") from None
                continue
            if kind == "error":
                self.close()
                raise ReplicaDied(f"{self._describe(index)} failed: {payload}")
            return kind, index, payload

    def __call__(self, requests: Sequence[Request], on_done: OnDone | None = None) -> list[Completion]:
        D = len(self.procs)
        for r in range(D):
            share = list(range(r, len(requests), D))
            self.inboxes[r].put((share, [requests[i] for i in share]) if share else ([], []))
        results: dict[int, Completion] = {}
        idle = 0
        while idle < D:
            kind, index, payload = self._next()
            if kind == "done":
                results[index] = payload
                if on_done is not None:
                    on_done(index, payload)
            elif kind == "idle":
                idle += 1
        if len(results) != len(requests):
            raise RuntimeError(f"the replicas returned {len(results)} completions for {len(requests)} requests")
        return [results[i] for i in range(len(requests))]

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> ReplicaGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
