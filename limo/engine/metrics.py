"""Device peaks, MFU, memory, and the per-step record: metrics.jsonl, a progress bar, TensorBoard.

MFU as ANCHORS.md defines it (causal-aware): the step's FLOPs (limo/model/flops.py) / step time /
(peak x devices), peak = 989 TFLOP/s dense bf16 on H100/H200. torchtitan's formula, which counts
attention as non-causal over the whole context, is reported beside it as `mfu_torchtitan`.
"""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from limo.engine.memory import host_rss_gib
from limo.tools.progress import progress_bar

# Dense bf16 tensor-core peaks, FLOP/s (vendor datasheets, without sparsity).
# The first name that is part of the device's name wins: the PCIe and NVL H100s come before the SXM one.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
                   "B200": 2250e12}  # fmt: skip


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where none is known (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GiB held so far: the CUDA caching allocator's peak, or the process's peak RSS on CPU
    (counted since engine.memory.PeakProbe reset it, before the model was built)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = host_rss_gib(peak=True)
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """One JSON object per optimizer step in output_dir/metrics.jsonl (rank 0), plus a progress bar."""

    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, start_step: int, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(start_step)
        self.bar = progress_bar(total_steps, "train", "step", initial=start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("train.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]'") from None

            self.tb = SummaryWriter(str(Path(output_dir) / "tb"))

    def _drop_records_after(self, step: int) -> None:
        """On resume, forget steps after the checkpoint: they are about to be run again."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a crash mid-write: that step is about to run again
                continue
            if record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)  # redraws as often as the bar allows (a log file: one line per interval)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def write(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
