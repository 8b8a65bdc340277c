"""What makes a checkpoint trustworthy: a manifest of every file's size and xxh3-64 checksum,
written as the bytes pass, checked before use; and a reader of DCP's pickle that runs nothing.

Saving: DCP writes through `HashingWriter`. Its streams hash the bytes as they pass (no second
read of a shard), and they keep the first OSError a write raised: torch's zip writer swallows it
and reports only "unexpected pos ...", without the errno or the file. Each rank hashes the files
it wrote; rank 0 gathers the entries and writes `manifest.json` last, atomically (tmp, fsync,
rename), before the checkpoint folder is renamed into place (limo/engine/checkpoint.py).

Resuming: `check_files` compares a share of the files with the manifest: the size first (a
truncated file costs one stat), then the checksum. `share` splits the files by size, so every
rank reads about 1/world of the checkpoint.

Cost, measured on the 2-core Xeon this was built on: xxh3-64 hashes 6.0 GB/s in memory and 4.7 GB/s
from the page cache, on one core (zlib's crc32 2.3 GB/s). A Qwen2.5-32B checkpoint is fp32
weights plus bf16 moments, 32.8e9 x 8 B = 262 GB, so 32.8 GB per rank on 8 ranks. That is ~5.5 s
of hashing per rank per save. It runs inside the save, whose time step_time already excludes;
no training step waits on it. Verifying on resume reads each rank's share once more: ~7 s at
4.7 GB/s, longer where the filesystem reads slower.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

MANIFEST = "manifest.json"
REQUIRED = (".metadata", "train_state.json")  # a manifest without these describes no checkpoint of ours
_CHUNK = 16 << 20  # bytes read per update when verifying

TRAIN_STATE_KEYS = ("step", "bad_steps", "scheduler", "loader")

Entry = dict[str, Any]  # {"size": int, "xxh3_64": str}
Problem = tuple[str, str]  # (kind, message naming the file): why a checkpoint cannot be used


class ManifestError(ValueError):
    """A manifest that is missing or cannot be read; the message names the file."""


def entry_of(data: bytes) -> Entry:
    return {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}


def digest_file(path: Path) -> str:
    h, view = xxhash.xxh3_64(), memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


class _HashingStream:
    """A file being written: what passes is hashed and counted; the first OSError is kept."""

    def __init__(self, file: Any, path: Path, fs: HashingFileSystem):
        self.file, self.path, self.fs = file, path, fs
        self.hash, self.size = xxhash.xxh3_64(), 0

    def _guard(self, op, *args):
        try:
            return op(*args)
        except OSError as e:
            self.fs.note(self.path, e)
            raise

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            if self.fs.fail_with is not None:
                raise OSError(self.fs.fail_with, os.strerror(self.fs.fail_with), str(self.path))
            n = self.file.write(view)
        except OSError as e:
            self.fs.note(self.path, e)
            raise
        self.hash.update(view)
        self.size += view.nbytes
        return n

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        self._guard(self.file.flush)

    def fileno(self) -> int:
        self.flush()  # DCP fsyncs this descriptor: what is buffered must reach it first
        return self.file.fileno()

    def close(self) -> None:
        self._guard(self.file.close)


class HashingFileSystem(FileSystem):
    """DCP's local filesystem, keeping {file name: entry} of each file written through it."""

    def __init__(self, fail_with: int | None = None, on_write: Callable[[], None] | None = None):
        super().__init__()
        self.fail_with = fail_with  # an errno every write raises (fault injection for tests)
        self.on_write = on_write  # called as each file is opened for writing (fault injection for tests)
        self.files: dict[str, Entry] = {}
        self.error: tuple[str, OSError] | None = None

    def note(self, path: Path, error: OSError) -> None:
        if self.error is None:
            self.error = (Path(path).name, error)

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        if self.on_write is not None:
            self.on_write()
        try:
            file = open(path, mode)  # noqa: SIM115  (closed by the stream that wraps it, below)
        except OSError as e:
            self.note(path, e)
            raise
        stream = _HashingStream(file, path, self)
        try:
            yield stream
        finally:
            stream.close()
        self.files[path.name] = {"size": stream.size, "xxh3_64": stream.hash.hexdigest()}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes `.metadata.tmp`, then renames it
        if Path(path).name in self.files:
            self.files[Path(new_path).name] = self.files.pop(Path(path).name)


class HashingWriter(FileSystemWriter):
    """DCP's FileSystemWriter (one file per rank, fsynced) writing through a HashingFileSystem."""

    def __init__(self, path: str | os.PathLike, fail_with: int | None = None, on_write: Callable[[], None] | None = None,
                 name: str | None = None):
        super().__init__(path)
        self.fs = HashingFileSystem(fail_with, on_write)
        self.name = name  # the checkpoint's own name, for .metadata's StorageMeta

    def storage_meta(self) -> StorageMeta:
        """The checkpoint's name for both ids (not DCP's random save id and the temporary path),
        so a checkpoint's bytes depend on its contents alone: an async save equals a synchronous one."""
        name = self.name or Path(self.path).name
        return StorageMeta(checkpoint_id=name, save_id=name)


def write_manifest(folder: Path, files: dict[str, Entry], step: int) -> None:
    """manifest.json in `folder`, atomically: a reader finds the whole manifest or none."""
    body = json.dumps({"step": step, "hash": "xxh3_64", "files": dict(sorted(files.items()))}, indent=1)
    tmp = folder / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Entry]:
    """{file name: entry} of the checkpoint in `folder`."""
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_text())["files"]
        entries = {name: {"size": int(e["size"]), "xxh3_64": str(e["xxh3_64"])} for name, e in files.items()}
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing, so nothing in {folder.name} can be verified") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    missing = [name for name in REQUIRED if name not in entries]
    if missing:
        raise ManifestError(f"{path}: lists no {', '.join(missing)}")
    return entries


def share(entries: dict[str, Entry], rank: int, world: int) -> list[str]:
    """The files `rank` verifies: largest first, each to the least loaded rank (same on every rank)."""
    load, mine = [0] * world, []
    for name in sorted(entries, key=lambda n: (-entries[n]["size"], n)):
        r = load.index(min(load))
        load[r] += entries[name]["size"] + 1
        if r == rank:
            mine.append(name)
    return mine


def check_files(folder: Path, entries: dict[str, Entry], names: list[str]) -> list[tuple[str, str]]:
    """(kind, message) for each of `names` in `folder` that differs from its entry; kind is
    missing, unreadable, truncated, grown or corrupt."""
    problems = []
    for name in names:
        path, want = folder / name, entries[name]
        try:
            size = path.stat().st_size
            if size != want["size"]:
                kind = "truncated" if size < want["size"] else "grown"
                problems.append((kind, f"{path}: {size:,} bytes, but {want['size']:,} were written ({kind})"))
            elif (got := digest_file(path)) != want["xxh3_64"]:
                problems.append(("corrupt", f"{path}: xxh3-64 {got}, but {want['xxh3_64']} was written (its bytes changed)"))
        except FileNotFoundError:
            problems.append(("missing", f"{path}: missing"))
        except OSError as e:
            problems.append(("unreadable", f"{path}: cannot be read ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror})"))
    return problems


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


def unparsable(folder: Path, entries: dict[str, Entry]) -> list[Problem]:
    """Files of `folder` whose bytes are as written but do not parse (a writer's bug, another
    version's format): DCP's index, the train state, the RNG states."""
    problems = []
    for name in entries:
        path = folder / name
        try:
            if name == ".metadata":
                SafeReader(str(folder)).read_metadata()
            elif name == "train_state.json":
                missing = [k for k in TRAIN_STATE_KEYS if k not in json.loads(path.read_text())]
                if missing:
                    raise ValueError(f"lacks {', '.join(missing)}")
            elif name.endswith(".json"):
                json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001  (whatever stops it parsing makes the checkpoint unusable)
            problems.append(("unreadable", f"{path}: does not parse ({type(e).__name__}: {e})"))
    return problems
