"""Preemption: a SIGTERM or SIGINT ends the run at the next step boundary with a checkpoint.

Clusters end jobs with SIGTERM (SLURM at the time limit or on preemption, Kubernetes on
eviction; torchrun passes it to its workers and sends SIGKILL 30 s later). Each rank records the
signal; after every step the ranks agree (one all-reduce of a flag), so all of them stop after
the same step. That step is saved, marked as a preemption save (train_state.json: "preempted"),
and every rank exits with PREEMPTED_EXIT. Rerunning the command resumes from it bitwise.

A second signal during the save changes nothing: the save goes on (and were the process killed
instead, its half-written folder is never the newest complete checkpoint). If the grace time
(train.preemption_grace_s, default 25 s) runs out before the rank is done, it exits at once with
the same code: the previous checkpoint is the newest complete one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, with the newest checkpoint complete; rerun to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised on every rank once the preemption save is written (or was not needed)."""


class Preemption:
    """The signal handlers of one training process, installed for the step loop's lifetime."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> Preemption:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._watchdog is not None and exc[0] is not Preempted:
            self._watchdog.cancel()  # past a preemption save it still bounds the exit; any other end lets its error through

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            log.warning("%s again: still finishing the step and its save; the previous checkpoint stays intact",
                        signal.Signals(signum).name)
            return
        self.signum = signum
        log.warning("%s: stopping after this step with a checkpoint, within %.0f s", self.name, self.grace_s)
        self._watchdog = threading.Timer(self.grace_s, self._late)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _late(self) -> None:
        log.error("%s: the grace time of %.0f s ran out before the save was complete; exiting now (the newest complete "
                  "checkpoint is the previous one)", self.name, self.grace_s)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(PREEMPTED_EXIT)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was signalled: every rank gets the same answer at the same step."""
        flag = torch.tensor([0 if self.signum is None else 1], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())  # intended host sync, once per step beside the step's own
