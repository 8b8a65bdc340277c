"""Damage done to a checkpoint folder the way disks, networks and full filesystems do it.

DAMAGE maps a name to (harm, kind, file): `harm(folder, rank)` damages the checkpoint in
`folder` (a shard named by `rank`); `kind` is the name the resume gives it when it sets the
checkpoint aside; `file(rank)` is the file its message must name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from limo.engine.checkpoint import SafeReader


def flip(path: Path, offset: int, n: int) -> None:
    """Invert n bytes of `path` from `offset`: the file keeps its size."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def weight_span(folder: Path, rank: int) -> tuple[Path, int, int]:
    """(file, offset, length) of the first model weight matrix that rank's shard file holds."""
    metadata = SafeReader(str(folder)).read_metadata()
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: kv[0].fqn):
        if index.fqn.startswith("model.") and index.fqn.endswith("proj.weight") and info.relative_path == f"__{rank}_0.distcp":
            return folder / info.relative_path, info.offset, info.length
    raise AssertionError(f"no weight matrix in {folder}/__{rank}_0.distcp")


def _shard(folder: Path, rank: int) -> Path:
    return folder / f"__{rank}_0.distcp"


def _flip_mid_shard(folder: Path, rank: int) -> None:
    shard = _shard(folder, rank)
    flip(shard, shard.stat().st_size // 2, 4096)


def _flip_weight(folder: Path, rank: int) -> None:
    file, offset, length = weight_span(folder, rank)
    flip(file, offset + length // 2, 64)


DAMAGE: dict[str, tuple[Callable[[Path, int], None], str, Callable[[int], str]]] = {
    "4 KiB flipped mid-shard": (_flip_mid_shard, "corrupt", lambda r: f"__{r}_0.distcp"),
    "64 bytes flipped in a weight": (_flip_weight, "corrupt", lambda r: f"__{r}_0.distcp"),
    "truncated shard": (lambda f, r: truncate(_shard(f, r)), "truncated", lambda r: f"__{r}_0.distcp"),
    "truncated .metadata": (lambda f, r: truncate(f / ".metadata"), "truncated", lambda r: ".metadata"),
    "train state deleted": (lambda f, r: (f / "train_state.json").unlink(), "missing", lambda r: "train_state.json"),
    "train state torn": (lambda f, r: truncate(f / "train_state.json"), "truncated", lambda r: "train_state.json"),
    "manifest deleted": (lambda f, r: (f / "manifest.json").unlink(), "unverifiable", lambda r: "manifest.json"),
}
