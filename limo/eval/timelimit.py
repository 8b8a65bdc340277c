"""Call a function under a wall-clock limit, from any thread: in a worker process that is killed
when the limit passes.

Why a process: sympy cannot be interrupted from outside a thread, and signal.alarm (which
math-verify uses) works only on the main thread of the main process; an evaluation harness grades
from thread pools. A worker that runs past its limit or dies (e.g. at its memory cap) is killed
and replaced at once; a healthy one is reused, so the steady-state cost is one pipe round trip.

Workers are fresh interpreters (`python -m limo.eval.timelimit`), not forks: a fork would copy the
threads and locks torch holds in the parent, and multiprocessing's spawn/forkserver re-import
the parent's __main__ script in the child. Calls and replies are JSON lines on the worker's
stdin/stdout, so only plain data crosses (no pickle from a process that chewed on model output).
The limit counts from the moment a ready worker receives the call; waiting for a worker to
start (the first call, or right after a kill) has its own bound, STARTUP_TIMEOUT_S.
POSIX only (select on pipes).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

STARTUP_TIMEOUT_S = 120.0
# Address-space cap per worker: 10^(10^10) and friends fail with MemoryError instead of taking
# the host's memory while the clock runs.
MEMORY_LIMIT_BYTES = 4 << 30
_ROOT = Path(__file__).resolve().parents[2]


class TimeLimitExceeded(TimeoutError):
    """The call did not finish within its limit; its worker was killed."""


class WorkerCrashed(RuntimeError):
    """The worker died during the call (memory cap, interpreter crash); it was replaced."""


class WorkerError(RuntimeError):
    """The function raised in the worker: a bug to see, not an answer to grade."""


def serve(preload: list[str]) -> None:
    """Worker loop: cap memory, import `preload`, say ready, then answer one JSON call per line."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ValueError, OSError):  # a lower hard limit is already in place: keep it
        pass
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the channel
    for name in preload:
        importlib.import_module(name)
    channel.write('{"status": "ready"}\n')
    channel.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            fn = getattr(importlib.import_module(request["module"]), request["name"])
            reply = {"status": "ok", "value": fn(*request["args"])}
        except MemoryError:
            os._exit(3)  # the parent sees a crash; the interpreter may be unusable now
        except Exception as e:  # noqa: BLE001 - reported to the caller, who raises it
            reply = {"status": "error", "value": f"{type(e).__name__}: {e}"[:2000]}
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


class _Worker:
    def __init__(self, preload: tuple[str, ...]):
        path = [str(_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "limo.eval.timelimit", *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, cwd=str(_ROOT))
        self._buffer = b""
        self.ready = False

    def _read_line(self, timeout_s: float) -> dict | None:
        """The next JSON line from the worker; None when the time runs out; EOFError if it died."""
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            reply = self._read_line(STARTUP_TIMEOUT_S)
        except EOFError:
            reply = None
        if reply != {"status": "ready"}:
            raise RuntimeError(f"a time-limit worker (python -m limo.eval.timelimit) did not start within "
                               f"{STARTUP_TIMEOUT_S:.0f} s (exit code {self.process.poll()}); see its stderr above")
        self.ready = True

    def call(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        self.wait_ready()
        request = json.dumps({"module": fn.__module__, "name": fn.__qualname__, "args": list(args)})
        try:
            self.process.stdin.write(request.encode() + b"\n")
            self.process.stdin.flush()
            reply = self._read_line(timeout_s)
        except (EOFError, BrokenPipeError) as e:
            raise WorkerCrashed(f"the worker running {fn.__qualname__} died (exit code {self.process.poll()})") from e
        if reply is None:
            raise TimeLimitExceeded(f"{fn.__qualname__} ran past its {timeout_s:g} s limit")
        if reply["status"] == "error":
            raise WorkerError(f"{fn.__qualname__}{args!r:.200} raised in the worker: {reply['value']}")
        return reply["value"]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


class WorkerPool:
    """Reusable time-limited workers; safe to call from many threads at once. At most `max_workers`
    (default: the CPU count) exist: a thread that finds them all busy waits for one rather than
    starting another, since a start costs seconds of imports and extra workers only share the
    same cores. The wait does not count against a call's limit."""

    def __init__(self, preload: tuple[str, ...] = (), max_workers: int | None = None):
        self.preload = tuple(preload)
        self.max_workers = max_workers or os.cpu_count() or 2
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(self.max_workers)
        atexit.register(self.close)

    def _take(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker(self.preload)

    def _put(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def call(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        """fn(*args) in a worker, or TimeLimitExceeded / WorkerCrashed / WorkerError. `fn` must be
        a module-level function (the worker imports it by name); args and result must be JSON."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        with self._slots:
            worker = self._take()
            try:
                result = worker.call(fn, args, timeout_s)
            except (TimeLimitExceeded, WorkerCrashed):
                worker.kill()
                self._put(_Worker(self.preload))  # a spare, starting now, for the next call
                raise
            except BaseException:
                worker.kill()
                raise
            self._put(worker)
            return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


if __name__ == "__main__":
    serve(sys.argv[1:])
