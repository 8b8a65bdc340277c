"""Checkpoints of a tiny model saved by one process, without a training run: the manifest, each
kind of damage set aside, a dead run's leftovers, a live second writer, a full disk and a real
I/O error; the safe metadata reader; torn metrics lines. (Runs on 1 and 2 ranks, SIGKILL and
reruns are end to end in test_train.py and test_recovery.py.)"""

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from limo.engine import checkpoint
from limo.engine.checkpoint import Checkpointer, CheckpointWriteError, SafeReader
from limo.engine.integrity import digest_file, share
from limo.engine.metrics import MetricsLogger, peak_flops_of
from limo.model.qwen2 import PRESETS, build_model
from tests.conftest import ROOT
from tests.damage import DAMAGE


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


STATE = {"step": 0, "bad_steps": 0, "scheduler": {}, "loader": {}, "settings": {"optim.lr": 1e-3}}


def _tiny():
    """The tiny model with every weight drawn (build_model leaves the head's memory as it finds it)."""
    model = build_model(PRESETS["tiny"], device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    return model


def _train_and_save(folder, steps):
    """{step: the model's tensors then} of a tiny model saved at `steps` by one process, without
    a process group, into folder/checkpoints."""
    model = _tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt, tensors = Checkpointer(folder, keep_last=3, rank=0), {}
    for step in steps:
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
        optimizer.zero_grad()
        ckpt.save(step, model, optimizer, {**STATE, "step": step})
        tensors[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return tensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(a folder holding checkpoints of steps 2, 4 and 6, {step: tensors}), made once."""
    folder = tmp_path_factory.mktemp("saved")
    return folder, _train_and_save(folder, (2, 4, 6))


def _copy(saved, tmp_path):
    """A copy of the saved run and the Checkpointer a rerun in it would use."""
    shutil.copytree(saved[0] / "checkpoints", tmp_path / "checkpoints")
    return Checkpointer(tmp_path, keep_last=3, rank=0), saved[1]


def _loads_back(ckpt, path, want) -> bool:
    model = build_model(PRESETS["tiny"], device="cpu")
    ckpt.load(path, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    return all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_a_save_carries_a_manifest_of_every_file_and_verifies(saved, tmp_path):
    ckpt, tensors = _copy(saved, tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000006"
    files = json.loads((newest / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in newest.iterdir() if p.name != "manifest.json")
    for name, entry in files.items():  # hashed as written == hashed from disk
        assert entry == {"size": (newest / name).stat().st_size, "xxh3_64": digest_file(newest / name)}, name
    assert ckpt.resume_point() == newest and _loads_back(ckpt, newest, tensors[6])
    assert sorted(p.name for p in newest.parent.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_kind_of_damage_is_named_and_set_aside_and_the_one_before_resumes(saved, tmp_path, caplog, damage):
    ckpt, tensors = _copy(saved, tmp_path)
    root = tmp_path / "checkpoints"
    harm, kind, file = DAMAGE[damage]
    before = sorted(p.name for p in (root / "step-00000006").iterdir())
    harm(root / "step-00000006", 0)
    left = sorted(p.name for p in (root / "step-00000006").iterdir())
    assert ckpt.resume_point() == root / "step-00000004"
    assert _loads_back(ckpt, root / "step-00000004", tensors[4])
    aside = root / "set-aside" / f"step-00000006.{kind}"
    assert sorted(p.name for p in aside.iterdir()) == left and len(left) >= len(before) - 1  # renamed, nothing deleted
    assert f"{root}/step-00000006/{file(0)}" in caplog.text and f"set aside as {aside}" in caplog.text


def test_a_train_state_that_does_not_parse_is_set_aside_though_its_bytes_verify(saved, tmp_path, caplog):
    ckpt, _ = _copy(saved, tmp_path)
    model = build_model(PRESETS["tiny"], device="cpu")
    ckpt.save(8, model, torch.optim.AdamW(model.parameters()), {"step": 8})  # written as is, so its checksum holds
    assert ckpt.resume_point() == tmp_path / "checkpoints" / "step-00000006"
    assert "step-00000008/train_state.json: does not parse (ValueError: lacks bad_steps, scheduler, loader)" in caplog.text
    assert (tmp_path / "checkpoints" / "set-aside" / "step-00000008.unreadable").is_dir()


def test_when_nothing_verifies_the_run_starts_from_zero_and_keeps_everything(saved, tmp_path, caplog):
    ckpt, _ = _copy(saved, tmp_path)
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step-{step:08d}" / "manifest.json").unlink()  # as a checkpoint from before manifests
    assert ckpt.resume_point() is None and "this run starts from step 0" in caplog.text
    assert sorted(p.name for p in (root / "set-aside").iterdir()) == [f"step-0000000{k}.unverifiable" for k in (2, 4, 6)]


def test_a_dead_runs_leftovers_are_moved_out_of_the_way_with_a_message(saved, tmp_path, caplog):
    ckpt, _ = _copy(saved, tmp_path)
    root = tmp_path / "checkpoints"
    (root / ".step-00000007.tmp").mkdir()
    (root / ".step-00000007.tmp" / "__0_0.distcp").write_bytes(b"half")
    assert ckpt.resume_point() == root / "step-00000006"
    assert not (root / ".step-00000007.tmp").exists() and "step-00000007.tmp: an unfinished save" in caplog.text
    (root / "step-00000008").mkdir()  # a dead run's step in the way of this run's save: never "already exists"
    model = build_model(PRESETS["tiny"], device="cpu")
    ckpt.save(8, model, torch.optim.AdamW(model.parameters()), {**STATE, "step": 8})
    assert (root / "set-aside" / "step-00000008.stale").is_dir() and "left by a run that no longer exists" in caplog.text
    assert ckpt.resume_point() == root / "step-00000008"


def test_a_second_live_writer_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid 4242 on elsewhere'); f.flush(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / ".checkpoints.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=r"is being written by another live run \(pid 4242 on elsewhere, which holds"):
            Checkpointer(tmp_path, keep_last=2, rank=0).resume_point()
    finally:
        holder.kill()
        holder.wait()
    assert Checkpointer(tmp_path, keep_last=2, rank=0).resume_point() is None  # the kernel dropped the dead one's lock


def test_a_full_disk_fails_the_save_with_one_message_and_leaves_no_partial_folder(saved, tmp_path, monkeypatch):
    ckpt, _ = _copy(saved, tmp_path)
    model = build_model(PRESETS["tiny"], device="cpu")
    monkeypatch.setenv("ENGINE_CRASH_AT", "nospace:8")  # every write of the shard raises ENOSPC inside DCP's writer
    with pytest.raises(CheckpointWriteError) as e:
        ckpt.save(8, model, torch.optim.AdamW(model.parameters()), {**STATE, "step": 8})
    root = tmp_path / "checkpoints"
    message = str(e.value)
    assert f"saving checkpoint {root}/step-00000008 failed: rank 0 writing __0_0.distcp: No space left on device (ENOSPC)" in message
    assert re.search(r"needs about 0\.01 GB \(9,85\d,\d{3} bytes\); [\d.]+ GB \([\d,]+ bytes\) are free there", message)
    assert "the newest checkpoint, step-00000006, is untouched" in message
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]


def test_a_real_io_error_is_named_though_torch_hides_it(tmp_path):
    """The kernel's own EFBIG (a file-size limit), through DCP and torch's zip writer, which reports
    it only as 'unexpected pos'."""
    script = (
        "import resource, sys, torch\n"
        "from limo.engine.checkpoint import Checkpointer\n"
        "from limo.model.qwen2 import PRESETS, build_model\n"
        "model = build_model(PRESETS['tiny'], device='cpu')\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # Python ignores SIGXFSZ: writes past it raise EFBIG\n"
        "Checkpointer(sys.argv[1], 2, 0).save(1, model, torch.optim.AdamW(model.parameters()), {})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "CheckpointWriteError: saving checkpoint" in proc.stderr and "rank 0 writing __0_0.distcp: File too large (EFBIG)" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []


def test_room_for_the_checkpoints_to_come_is_checked(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep_last=2, rank=0)
    ckpt.check_room(1000)
    assert not caplog.text
    ckpt.check_room(10**15)
    assert "but 3 more checkpoint(s) of 1000000.00 GB (1,000,000,000,000,000 bytes) need 3000000.00 GB" in caplog.text


def test_the_files_to_verify_are_shared_by_size_over_the_ranks():
    entries = {f"f{i}": {"size": size, "xxh3_64": ""} for i, size in enumerate([90, 10, 50, 50, 3, 0, 7])}
    shares = [share(entries, rank, 3) for rank in range(3)]
    assert sorted(name for names in shares for name in names) == sorted(entries)
    assert [sum(entries[n]["size"] for n in s) for s in shares] == [90, 60, 60]


def test_the_preflight_reads_the_settings_of_the_newest_readable_checkpoint(saved, tmp_path):
    ckpt, _ = _copy(saved, tmp_path)
    root = tmp_path / "checkpoints"
    assert ckpt.recorded_settings() == (root / "step-00000006", {"optim.lr": 1e-3})
    (root / "step-00000006" / "train_state.json").write_text('{"step": ')
    assert ckpt.recorded_settings() == (root / "step-00000004", {"optim.lr": 1e-3})


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


def test_an_async_save_stages_returns_and_completes_before_the_next_one(tmp_path):
    """At most one save in flight: the second waits for the first, which is then complete; the
    one in flight is not a checkpoint until wait() (or poll()) completes it, and then it equals a
    synchronous save byte for byte."""
    model = _tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sync, later = Checkpointer(tmp_path / "sync", keep_last=3, rank=0), Checkpointer(tmp_path / "async", keep_last=3, rank=0, async_save=True)
    for step in (2, 4):
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
        optimizer.zero_grad()
        sync.save(step, model, optimizer, {**STATE, "step": step})
        later.save(step, model, optimizer, {**STATE, "step": step})
        assert [p.name for p in later.complete()] == (["step-00000002"] if step == 4 else [])  # 4 is in flight
    later.wait()
    assert [p.name for p in later.complete()] == ["step-00000002", "step-00000004"] and later.resume_point().name == "step-00000004"
    for step in ("step-00000002", "step-00000004"):
        a, b = tmp_path / "sync" / "checkpoints" / step, tmp_path / "async" / "checkpoints" / step
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert all((a / p.name).read_bytes() == (b / p.name).read_bytes() for p in a.iterdir())


def test_an_async_save_whose_start_failed_fails_at_the_next_poll(tmp_path, monkeypatch):
    """A failure while staging leaves no future: poll() must still complete (and so fail) that
    save, on every rank, at the next step; before, a rank in that state skipped poll's gather
    while the others entered it."""
    model = _tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = Checkpointer(tmp_path / "run", keep_last=3, rank=0, async_save=True)

    def fail(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(checkpoint.dcp, "async_save", fail)
    ckpt.save(2, model, optimizer, {**STATE, "step": 2})  # returns: the failure is reported where saves complete
    with pytest.raises(CheckpointWriteError, match=r"saving checkpoint .*step-00000002 failed: .*Cannot allocate memory"):
        ckpt.poll()
    assert ckpt.complete() == [] and not list((tmp_path / "run" / "checkpoints").glob(".step-*"))
