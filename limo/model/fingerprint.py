"""Which model a folder of weights holds, as a short content hash: what keeps one model's evaluation
results from being resumed by another. Reads only bytes, so the evaluation's grading process can
call it without loading torch."""

from __future__ import annotations

import hashlib
from pathlib import Path


def model_fingerprint(model_dir: str | Path) -> str:
    """A short content hash of an HF model folder: config.json, and each weight file's size and 16
    sampled 64 KiB windows. Retrained weights change it; re-exporting the same weights does not.
    Cheap for a 65 GB model (1 MiB read per file)."""
    folder = Path(model_dir)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            for k in range(16):
                f.seek(size * k // 16)
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]
