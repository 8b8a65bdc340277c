"""Fault injection for the crash, preemption and full-disk tests: a run is told where to fail
through the environment, so the tests drive the real `limo/engine/train.py` under torchrun.

ENGINE_CRASH_AT names the place:
    step:N        after step N                       (train.py)
    write:N       while step N's shards are written   (checkpoint.py, inside DCP's writer)
    save:N        halfway through the save of step N: the shards written, before the rename
    nospace:N     step N's shard writes fail with ENOSPC inside DCP's writer (nospace:N:R: rank R only)
At a step:, write: or save: place the process kills itself with SIGKILL (ENGINE_CRASH_RANK=R: rank R
only), or with ENGINE_CRASH_SIGNAL=TERM rank 0 sends SIGTERM to its launcher, as a cluster's stop
does. Only in a run's first attempt: an elastic restart goes on unharmed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

log = logging.getLogger(__name__)


def crash_point(where: str) -> None:
    """At `where` (step:N, write:N, save:N), when ENGINE_CRASH_AT names it: SIGKILL this process, or
    SIGTERM the launcher (see above)."""
    if os.environ.get("ENGINE_CRASH_AT") != where or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank = os.environ.get("RANK", "0")
    if os.environ.get("ENGINE_CRASH_SIGNAL") == "TERM":
        if rank == "0":
            launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()  # plain python: itself
            log.warning("ENGINE_CRASH_AT=%s: sending SIGTERM to pid %d", where, launcher)
            os.kill(launcher, signal.SIGTERM)
            if launcher != os.getpid():  # torchrun forwards it to every rank: as on a cluster, all have it before the next check
                time.sleep(1.0)
        return
    if os.environ.get("ENGINE_CRASH_RANK", rank) == rank:
        log.warning("ENGINE_CRASH_AT=%s: killing this process now", where)
        os.kill(os.getpid(), signal.SIGKILL)


def injected_errno(step: int, rank: int) -> int | None:
    """ENGINE_CRASH_AT=nospace:N (or nospace:N:R): the errno the writes of step N fail with."""
    return errno.ENOSPC if os.environ.get("ENGINE_CRASH_AT") in (f"nospace:{step}", f"nospace:{step}:{rank}") else None
