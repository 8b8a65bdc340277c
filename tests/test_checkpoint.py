"""Checkpoint folder handling without a training run: the safe metadata reader, torn checkpoints,
torn metrics lines. (Saving, resuming and SIGKILL are exercised end to end in test_train.py.)"""

import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from engine.checkpoint import Checkpointer, SafeReader
from engine.metrics import MetricsLogger, peak_flops_of


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_metadata_is_read_without_running_what_a_pickle_names(tmp_path):
    good = tmp_path / "good"
    tensors = {"model": {"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(4, dtype=torch.bfloat16)}}
    dcp.save(tensors, checkpoint_id=str(good), no_dist=True)
    back = {"model": {"w": torch.zeros(2, 3), "h": torch.zeros(4, dtype=torch.bfloat16)}}
    dcp.load(back, storage_reader=SafeReader(str(good)), no_dist=True)
    assert torch.equal(back["model"]["w"], tensors["model"]["w"]) and torch.equal(back["model"]["h"], tensors["model"]["h"])

    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "it-ran"
    (evil / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(pickle.UnpicklingError, match=r"evil/\.metadata: names posix\.mkdir, which no checkpoint of ours holds"):
        SafeReader(str(evil)).read_metadata()
    assert not marker.exists()
    (evil / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(pickle.UnpicklingError, match="not a DCP metadata index"):
        SafeReader(str(evil)).read_metadata()


def test_a_torn_train_state_falls_back_to_the_checkpoint_before_it(tmp_path):
    root = tmp_path / "checkpoints"
    for step, text in ((2, '{"step": 2}'), (4, '{"step": 4}'), (6, '{"step": ')):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "train_state.json").write_text(text)
    (root / ".step-00000008.tmp").mkdir()
    ckpt = Checkpointer(tmp_path, keep_last=2, rank=0)
    assert ckpt.latest() == root / "step-00000004"
    assert ckpt.resume_point() == root / "step-00000004"  # no process group: rank 0's own choice
    assert Checkpointer(tmp_path / "empty", keep_last=2, rank=0).latest() is None


def test_resuming_metrics_drops_later_and_torn_lines(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)] + ['{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=10, start_step=2)
    logger.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops_of(name) == peak
