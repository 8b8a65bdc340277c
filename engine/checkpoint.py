"""Distributed checkpoints (DCP) that survive a crash at any moment, and the final HF export.

Layout of `output_dir/checkpoints/`:
    step-00000040/              a complete checkpoint; it exists only once everything is written
        .metadata, __*.distcp   DCP: model parameters and optimizer moments, sharded, tensors only
        train_state.json        step, scheduler, data-loader position (rank 0)
        rng-rank{r}.json        each rank's RNG states
    .step-00000060.tmp/         a save in progress (or one killed halfway): never read, removed later

Atomicity: every rank writes into the hidden tmp folder and fsyncs it, all ranks meet at a
barrier, then rank 0 renames it to `step-N/` (an atomic rename on one filesystem, which every
rank must share) and fsyncs the parent. A process killed before the rename leaves the newest
complete checkpoint untouched; one whose train_state.json cannot be read is passed over for the
one before it. Only tensors go through DCP, and its one pickle, the `.metadata` index, is read
by an unpickler that admits DCP's own metadata classes and nothing else; the rest is JSON.

`ENGINE_CRASH_AT=save:N` (tests only) kills the process with SIGKILL halfway through the save
of step N: after the shards are written, before the rename.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from engine.parallel import clean_name
from engine.weights import write_hf

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def crash_point(where: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process at `where` if asked to."""
    if os.environ.get("ENGINE_CRASH_AT") == where:
        log.warning("ENGINE_CRASH_AT=%s: killing this process now", where)
        os.kill(os.getpid(), signal.SIGKILL)


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


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit the classes it is made of, refuse anything else."""

    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }  # fmt: skip

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in self.MODULES or (module, name) in self.NAMES or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{self.where}: names {module}.{name}, which no checkpoint of ours holds; refusing to load it")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata index is read by _MetadataUnpickler (tensors already go
    through torch.load(weights_only=True))."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path}: not a DCP metadata index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, output_dir: str | os.PathLike, keep_last: int, rank: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last, self.rank = keep_last, rank

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "train_state.json").is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose train state reads back (a torn one is passed over)."""
        for path in reversed(self.complete()):
            try:
                json.loads((path / "train_state.json").read_text())
                return path
            except (OSError, ValueError) as e:
                log.warning("%s: train_state.json unreadable (%s); trying the checkpoint before it", path, e)
        return None

    def resume_point(self) -> Path | None:
        """latest() as rank 0 sees it, the same on every rank (directory listings may lag elsewhere)."""
        latest = self.latest() if self.rank == 0 else None
        choice = [str(latest) if latest else None]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def _tensors(self, model, optimizer) -> dict[str, Any]:
        # Optimizer param_groups hold Python numbers (lr, betas): they come from the config and
        # the scheduler, so only the per-parameter state tensors are saved.
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)["state"]}

    def save(self, step: int, model, optimizer, train_state: dict[str, Any]) -> Path:
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._tensors(model, optimizer), checkpoint_id=str(tmp))  # its writer fsyncs the shards
        _write_durably(tmp / f"rng-rank{self.rank}.json", json.dumps(_rng_state()))
        dist.barrier()
        crash_point(f"save:{step}")
        if self.rank == 0:
            if final.exists():  # train.py refuses to start a fresh run over old checkpoints, so never
                raise RuntimeError(f"{final} already exists: another run is writing checkpoints into {self.root}")
            _write_durably(tmp / "train_state.json", json.dumps(train_state, indent=1))
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, model, optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from `path`; returns the train state."""
        tensors = self._tensors(model, optimizer)
        dcp.load(tensors, storage_reader=SafeReader(str(path)))
        set_model_state_dict(model, tensors["model"])
        groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
        set_optimizer_state_dict(model, optimizer, {"state": tensors["optim"], "param_groups": groups})
        rng = path / f"rng-rank{self.rank}.json"
        if rng.is_file():  # absent when resuming on more ranks than saved: keep the seeded state
            _set_rng_state(json.loads(rng.read_text()))
        return json.loads((path / "train_state.json").read_text())


def _full_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(model name, full tensor) one parameter at a time: an all-gather each, on every rank."""
    for name, p in model.named_parameters():
        yield clean_name(name), p.full_tensor() if isinstance(p, DTensor) else p


def export_hf(
    model: torch.nn.Module,
    path: str | os.PathLike,
    rank: int,
    dtype: torch.dtype,
    tokenizer: Any = None,
    generation_config: str | os.PathLike | None = None,
) -> None:
    """Write the sharded model as a Hugging Face folder from rank 0, one tensor in memory at a time
    (with the base model's generation_config.json when given)."""
    if rank == 0:
        write_hf(path, model.args, _full_tensors(model), dtype=dtype, tokenizer=tokenizer, generation_config=generation_config)
    else:
        for _ in _full_tensors(model):  # take part in every all-gather
            pass
    dist.barrier()

