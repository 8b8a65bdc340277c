"""Distributed checkpoints (DCP) that survive a crash at any moment and are verified before use.

Layout of `output_dir/checkpoints/`:
    step-00000040/              a complete checkpoint; it exists only once everything is written
        .metadata, __*.distcp   DCP: model parameters and optimizer moments, sharded, tensors only
        train_state.json        step, scheduler, data-loader position, optimizer and schedule settings (rank 0)
        rng-rank{r}.json        each rank's RNG states
        manifest.json           size and xxh3-64 of every file above, written last (limo/engine/integrity.py)
    .step-00000060.tmp/         a save in progress, or one whose run died: never read, removed by the next run
    set-aside/step-00000020.corrupt/   a checkpoint that failed verification: renamed here, never deleted
and `output_dir/.checkpoints.lock`, which rank 0 of the run writing here holds (flock).

Atomicity: every rank writes into the hidden tmp folder and fsyncs it; rank 0 gathers every
rank's file checksums, writes train_state.json and then the manifest, renames the folder to
`step-N/` (an atomic rename on one filesystem, which every rank must share) and fsyncs the parent.
A process killed before the rename leaves the newest complete checkpoint untouched.

Trust: a resume verifies the newest checkpoint before loading anything. Every rank checks a share
of its files against the manifest (size, then checksum); rank 0 then parses the manifest,
`.metadata`, train_state.json and the RNG files; every rank learns every problem, so all agree.
A checkpoint with a problem is renamed into `set-aside/` (named for its first problem: corrupt,
truncated, missing, unreadable, unverifiable), each file and reason is logged, and the one
before it is tried. A checkpoint without a manifest (a lost one, or one written before manifests
existed) cannot be verified and is set aside the same way. DCP's `.metadata` is a pickle, read by
an unpickler that admits DCP's own metadata classes and nothing else; the rest is JSON.

One writer: a second live run writing into the same folder is refused (the lock). What a dead
run left is moved out of the way with a message: an unfinished `.step-N.tmp` is removed, a
`step-N/` in the way of a save is set aside.

A failed write (a full disk, an I/O error) fails the save on every rank with one
CheckpointWriteError: the checkpoint, each failing rank's file and errno, and the bytes needed
against the bytes free. The partial folder is removed; the earlier checkpoints are untouched.

The crash and full-disk tests inject their faults here through limo/engine/faults.py.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from limo.engine.distributed import all_gather_object, barrier, broadcast_object
from limo.engine.faults import crash_point, injected_errno
from limo.engine.integrity import (
    Entry,
    HashingWriter,
    ManifestError,
    Problem,
    SafeReader,
    check_files,
    entry_of,
    read_manifest,
    share,
    unparsable,
    write_manifest,
)

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
SET_ASIDE = "set-aside"
LOCK = ".checkpoints.lock"


class CheckpointWriteError(RuntimeError):
    """A save that could not be written (a full disk, an I/O error); raised on every rank."""


def _rng_state() -> dict[str, str]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def _set_rng_state(states: dict[str, str]) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["cpu"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(states["cuda"]))


def _write_durably(path: Path, text: str) -> Entry:
    data = text.encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return entry_of(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _errno(e: OSError) -> str:
    return f"{os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})" if e.errno else str(e)


def _failure(rank: int, written: tuple[str, OSError] | None, e: BaseException) -> str | None:
    """What this rank's part of a failed save says: the file and errno when a write raised one
    (torch's zip writer hides it behind "unexpected pos"); None when only another rank failed."""
    if written is not None:
        return f"rank {rank} writing {written[0]}: {_errno(written[1])}"
    if isinstance(e, CheckpointException):  # DCP hands every rank the failures of all
        if rank not in e.failures:
            return None
        e = e.failures[rank][0]
    if isinstance(e, OSError):
        return f"rank {rank} writing {Path(e.filename).name if e.filename else 'a file'}: {_errno(e)}"
    return f"rank {rank}: {type(e).__name__}: {e}"


def _bytes_written(tree: Any) -> int:
    """This rank's share of the bytes the checkpoint holds for `tree`: a tensor held by several
    ranks (replicated over HSDP replicas, or plain) is written once, so each counts its part."""
    if isinstance(tree, dict):
        return sum(_bytes_written(v) for v in tree.values())
    if isinstance(tree, DTensor):
        copies = math.prod(tree.device_mesh.size(i) for i, p in enumerate(tree.placements) if p.is_replicate())
        local = tree.to_local()
        return local.numel() * local.element_size() // copies
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size() // (dist.get_world_size() if dist.is_initialized() else 1)
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB ({n:,} bytes)"


@dataclass
class _Save:
    """A save between its start and its completion (at once when synchronous)."""

    step: int
    final: Path
    tmp: Path
    writer: HashingWriter
    train_state: dict[str, Any]
    nbytes: int  # this rank's share of the checkpoint, for a failure's message
    rng: str  # this rank's RNG state at the save, as JSON
    future: Future | None = None  # async_save: DCP's background write
    error: str | None = None


class Checkpointer:
    def __init__(self, output_dir: str | os.PathLike, keep_last: int, rank: int, async_save: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last, self.rank, self.async_save = keep_last, rank, async_save
        self._lock_file: Any = None  # rank 0's open lock file, held for the life of the process
        self._claimed = False
        self._pending: _Save | None = None  # the save in flight (async_save), completed by poll() or wait()
        self._group: Any = None  # async_save: a gloo group of its own for the background writes' collectives

    def complete(self) -> list[Path]:
        """Checkpoint folders renamed into place, oldest first (each still to be verified)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())

    # -- one writer ------------------------------------------------------------------------------

    def _claim(self) -> None:
        """Make this run the folder's only writer, or refuse on every rank (collective, once)."""
        if self._claimed:
            return
        refusal = broadcast_object(self._lock() if self.rank == 0 else None)
        if refusal:
            raise RuntimeError(refusal)
        self._claimed = True

    def _lock(self) -> str | None:
        """Rank 0 holds an flock on output_dir/.checkpoints.lock while the process lives; the
        kernel drops it when the process dies, however it dies. The refusal, if another holds it."""
        path = self.root.parent / LOCK
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")  # noqa: SIM115  (kept open: the lock lives as long as the file stays open)
        except OSError as e:
            return f"{path}: cannot be opened ({_errno(e)}), so no checkpoint can be written into {self.root}"
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            holder = path.read_text().strip() or "a process"
            return (f"{self.root} is being written by another live run ({holder}, which holds {path}): two runs would "
                    "overwrite each other's checkpoints; wait for it to end, or choose another train.output_dir")
        except OSError as e:  # a filesystem mounted without locks
            f.close()
            log.warning("%s: cannot take the lock (%s); a second run writing into %s would go unnoticed", path, _errno(e), self.root)
            return None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f
        return None

    def _remove_unfinished(self) -> None:
        """Rank 0, holding the lock: unfinished saves are a dead run's (never a checkpoint; removed)."""
        for tmp in sorted(self.root.glob(".step-*.tmp")):
            log.warning("%s: an unfinished save of a run that no longer exists; removing it", tmp)
            shutil.rmtree(tmp, ignore_errors=True)

    def _set_aside(self, path: Path, problems: list[Problem], why: str) -> Path:
        """Rank 0: rename `path` into set-aside/, named for its first problem; nothing is deleted."""
        aside = self.root / SET_ASIDE
        aside.mkdir(exist_ok=True)
        dest, k = aside / f"{path.name}.{problems[0][0]}", 1
        while dest.exists():
            k += 1
            dest = aside / f"{path.name}.{problems[0][0]}-{k}"
        os.rename(path, dest)
        _fsync_dir(self.root)
        listed = "".join(f"\n  {message}" for _, message in problems)
        log.warning("%s %s:%s\nset aside as %s (renamed; nothing deleted)", path, why, listed, dest)
        return dest

    # -- resume ----------------------------------------------------------------------------------

    def resume_point(self) -> Path | None:
        """The newest checkpoint that verifies, the same on every rank; each newer one that does not
        is set aside first (collective). None when there is none."""
        self._claim()
        names = broadcast_object([p.name for p in reversed(self.complete())] if self.rank == 0 else None)
        if self.rank == 0:
            self._remove_unfinished()
        for name in names:
            path, start = self.root / name, time.perf_counter()
            problems = self._problems(path)
            if not problems:
                if self.rank == 0:
                    log.info("%s verified against its manifest in %.1f s", path, time.perf_counter() - start)
                return path
            if self.rank == 0:
                self._set_aside(path, problems, "cannot be trusted; trying the checkpoint before it")
        if names and self.rank == 0:
            log.warning("no checkpoint in %s verifies: this run starts from step 0", self.root)
        return None

    def _problems(self, path: Path) -> list[Problem]:
        """Every problem of the checkpoint at `path`, the same list on every rank (collective)."""
        entries, problems = None, []
        if self.rank == 0:
            try:
                entries = read_manifest(path)
            except ManifestError as e:
                problems = [("unverifiable", str(e))]
        entries, problems = broadcast_object((entries, problems))
        if problems:
            return problems
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = check_files(path, entries, share(entries, self.rank, world))
        problems = [p for some in all_gather_object(mine) for p in some]
        if not problems and self.rank == 0:
            problems = unparsable(path, entries)
        return broadcast_object(problems)

    def recorded_settings(self) -> tuple[Path, dict[str, Any]] | None:
        """(checkpoint, its optimizer and schedule settings) of the newest checkpoint whose train
        state reads back. Unverified and without collectives: the preflight's look before any
        process group exists; train.py checks again the checkpoint it resumes from."""
        for path in reversed(self.complete()):
            try:
                return path, json.loads((path / "train_state.json").read_text())["settings"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    # -- save ------------------------------------------------------------------------------------

    def check_room(self, checkpoint_bytes: int) -> None:
        """Rank 0 warns when the filesystem cannot hold the checkpoints to come: keep_last + 1 at
        the peak (those kept and the one being written), less those already there."""
        if self.rank != 0:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        count = max(1, self.keep_last + 1 - len(self.complete()))
        need, free = count * checkpoint_bytes, shutil.disk_usage(self.root).free
        if free < need:
            log.warning("%s has %s free, but %d more checkpoint(s) of %s need %s: a save will fail for lack of space "
                        "(free some, lower checkpoint.keep_last, or choose another train.output_dir)",
                        self.root, _gb(free), count, _gb(checkpoint_bytes), _gb(need))

    def _tensors(self, model, optimizer) -> dict[str, Any]:
        # Optimizer param_groups hold Python numbers (lr, betas): they come from the config and
        # the scheduler, so only the per-parameter state tensors are saved.
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)["state"]}

    def save(self, step: int, model, optimizer, train_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` (collective). Synchronous: the shards are written and hashed as
        they go, then the manifest, then the rename. With async_save the state is staged to host
        memory and this returns: the write and its hashing go on in the background, and poll()
        (each step) or wait() completes the checkpoint once every rank's write has finished. At
        most one save is in flight: a second one waits for the first."""
        self.wait()
        self._claim()
        final, tmp = self.root / f"step-{step:08d}", self.root / f".step-{step:08d}.tmp"
        if self.rank == 0:
            self._remove_unfinished()
            tmp.mkdir(parents=True)
        barrier()
        tensors = self._tensors(model, optimizer)
        writer = HashingWriter(tmp, fail_with=injected_errno(step, self.rank), on_write=lambda: crash_point(f"write:{step}"), name=final.name)
        save = _Save(step, final, tmp, writer, train_state, _bytes_written(tensors), json.dumps(_rng_state()))
        try:
            if self.async_save and dist.is_initialized():
                if self._group is None:
                    self._group = dist.new_group(backend="gloo")  # DCP's collectives off the training's group
                save.future = dcp.async_save(tensors, storage_writer=writer, process_group=self._group)  # stages, then returns
            elif self.async_save:  # one process without a group (tests, tools)
                save.future = dcp.async_save(tensors, storage_writer=writer, no_dist=True)
            else:
                dcp.save(tensors, storage_writer=writer)  # its writer fsyncs the shards
        except (Exception, CheckpointException) as e:  # noqa: BLE001  (DCP's is a BaseException; every failure must reach every rank)
            save.error = _failure(self.rank, writer.fs.error, e)
        self._pending = save
        if not self.async_save:
            self.wait()
        return final

    def poll(self) -> None:
        """At a step boundary: complete the save in flight if every rank's write has finished (a
        failed one fails the run here, on every rank, with the save's message)."""
        if self._pending is not None:  # on every rank: one whose start failed holds no future, and gathers too
            done = all_gather_object(self._pending.future is None or self._pending.future.done())
            if all(done):
                self.wait()

    def wait(self) -> None:
        """Complete the save in flight, if any: its shards written and verified on every rank,
        then rank 0 writes the train state and the manifest and renames the folder into place."""
        save, self._pending = self._pending, None
        if save is None:
            return
        if save.error is None:
            try:
                if save.future is not None:
                    save.future.result()
                rng = f"rng-rank{self.rank}.json"
                save.writer.fs.files[rng] = _write_durably(save.tmp / rng, save.rng)
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                save.error = _failure(self.rank, save.writer.fs.error, e)
        reports = all_gather_object((save.error is not None, save.error, save.writer.fs.files, save.nbytes))
        needed = sum(r[3] for r in reports)
        self._raise_if_failed(save.final, save.tmp, [(r[0], r[1]) for r in reports], needed)
        crash_point(f"save:{save.step}")
        failed, detail = False, None
        if self.rank == 0:
            try:
                files = {name: entry for r in reports for name, entry in r[2].items()}
                self._complete(save.step, save.final, save.tmp, files, save.train_state)
            except OSError as e:
                failed, detail = True, _failure(0, None, e)
        self._raise_if_failed(save.final, save.tmp, [broadcast_object((failed, detail))], needed)

    def _complete(self, step: int, final: Path, tmp: Path, files: dict[str, Entry], train_state: dict[str, Any]) -> None:
        """Rank 0: the train state, then the manifest of everything, then the rename into place."""
        if final.exists():  # this run holds the lock: a dead run left it (a resume passes over newer ones)
            self._set_aside(final, [("stale", f"{final}: left by a run that no longer exists")], "is in the way of this run's save")
        files["train_state.json"] = _write_durably(tmp / "train_state.json", json.dumps(train_state, indent=1))
        write_manifest(tmp, files, step)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._prune()

    def _raise_if_failed(self, final: Path, tmp: Path, reports: list[tuple[bool, str | None]], needed: int) -> None:
        """When any rank failed, every rank raises the same error (none is left waiting in a
        collective); rank 0 first removes the partial folder."""
        if not any(failed for failed, _ in reports):
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        details = "; ".join(d for _, d in reports if d) or "see the traceback"
        free, kept = shutil.disk_usage(self.root).free, self.complete()
        raise CheckpointWriteError(
            f"saving checkpoint {final} failed: {details}. The checkpoint needs about {_gb(needed)}; {_gb(free)} "
            f"are free there. Its partial folder was removed; "
            + (f"the newest checkpoint, {kept[-1].name}, is untouched." if kept else "there is no earlier checkpoint.")
        )

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model, optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from `path` (verified by resume_point);
        returns the train state."""
        tensors = self._tensors(model, optimizer)
        dcp.load(tensors, storage_reader=SafeReader(str(path)))
        set_model_state_dict(model, tensors["model"])
        groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
        set_optimizer_state_dict(model, optimizer, {"state": tensors["optim"], "param_groups": groups})
        rng = path / f"rng-rank{self.rank}.json"
        if rng.is_file():  # absent when resuming on more ranks than saved: keep the seeded state
            _set_rng_state(json.loads(rng.read_text()))
        return json.loads((path / "train_state.json").read_text())
