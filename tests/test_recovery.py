"""Recovery end to end: limo/engine/train.py on 1 and 2 CPU ranks (torchrun + gloo), the tiny model of
test_train.py, saving every step.

Each reference is an uninterrupted 8-step run. Each test damages a copy of its folder the way
disks, networks and full filesystems do, then reruns the same command: the rerun names what it
cannot trust, sets it aside, and finishes with the reference's losses, bitwise. Settings that
cannot work stop train.py with exit code 2 before any process group.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, made_once
from tests.damage import DAMAGE
from tests.test_train import SMALL, losses, train

RUN = ("--train.max_steps=8", "--checkpoint.every_steps=1", "--checkpoint.keep_last=8", "--checkpoint.export_hf=false")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """nproc -> the folder of the uninterrupted run on that many ranks (each made once, when asked)."""
    return lambda nproc: made_once(tmp_path_factory, f"recovery-reference-{nproc}", lambda out: train(out, nproc, *RUN))


def _copy(reference: Path, out: Path, keep_to: int = 8) -> Path:
    """A copy of the reference's folder with its checkpoints up to step `keep_to`; its checkpoints folder."""
    shutil.copytree(reference, out)
    for step in range(keep_to + 1, 9):
        shutil.rmtree(out / "checkpoints" / f"step-{step:08d}")
    return out / "checkpoints"


@pytest.mark.parametrize("nproc", [1, 2])
def test_after_every_kind_of_damage_a_rerun_names_it_sets_it_aside_and_reproduces_the_losses(references, tmp_path, nproc):
    reference = references(nproc)
    out = tmp_path / "run"
    root = _copy(reference, out)
    damaged = []
    for i, (harm, kind, file) in enumerate(DAMAGE.values()):  # step 8 down to step 2, one kind each, ranks in turn
        step, rank = 8 - i, i % nproc
        harm(root / f"step-{step:08d}", rank)
        damaged.append((step, kind, file(rank)))
    rerun = train(out, nproc, *RUN)
    assert losses(out) == losses(reference)
    assert f"resumed from {root}/step-00000001 (step 1)" in rerun.stderr
    for step, kind, file in damaged:
        assert f"{root}/step-{step:08d}/{file}" in rerun.stderr and f"set aside as {root}/set-aside/step-{step:08d}.{kind}" in rerun.stderr
    assert sorted(p.name for p in (root / "set-aside").iterdir()) == sorted(f"step-{s:08d}.{k}" for s, k, _ in damaged)
    assert sorted(p.name for p in root.iterdir()) == ["set-aside"] + [f"step-{s:08d}" for s in range(1, 9)]  # re-saved in place


def test_a_full_disk_fails_a_save_with_one_message_and_the_rerun_finishes_the_run(references, tmp_path):
    reference = references(2)
    out = tmp_path / "run"
    root = _copy(reference, out, keep_to=6)
    failed = train(out, 2, *RUN, crash_at="nospace:7:1", check=False)  # rank 1's shard of step 7 meets a full disk
    assert failed.returncode != 0
    assert (f"saving checkpoint {root}/step-00000007 failed: rank 1 writing __1_0.distcp: No space left on device (ENOSPC). "
            "The checkpoint needs about 0.01 GB (9,8") in failed.stderr  # fmt: skip
    assert "are free there. Its partial folder was removed; the newest checkpoint, step-00000006, is untouched." in failed.stderr
    assert sorted(p.name for p in root.iterdir()) == [f"step-{s:08d}" for s in range(1, 7)]
    train(out, 2, *RUN)
    assert losses(out) == losses(reference)


def _train_py(out: Path, *args: str) -> subprocess.CompletedProcess:
    """train.py as a plain process (a world of one): what it does before any process group."""
    cmd = [sys.executable, "limo/engine/train.py", "--config", "configs/demo.toml", *SMALL, *RUN, f"--train.output_dir={out}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("args, message", [
    (["--optim.lr=nan"], "error: optim.lr=nan must be a finite number"),  # lr=inf, betas, eps...: tests/test_config.py
    (["--eval.benchmarks=synthetic,aime25"], "error: eval.benchmarks: unknown benchmark 'aime25'; known: aime24,"),
])  # fmt: skip
def test_settings_that_cannot_work_exit_2_before_any_process_group(tmp_path, args, message):
    proc = _train_py(tmp_path / "run", *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_resume_with_another_lr_is_refused_unless_overridden_and_then_trains_on_with_it(references, tmp_path):
    reference = references(1)
    out = tmp_path / "run"
    root = _copy(reference, out, keep_to=4)
    refused = _train_py(out, "--optim.lr=1e-3")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert (f"error: {root}/step-00000004 was made with other optimizer/schedule settings (optim.lr: 0.003 there, 0.001 here). "
            "Rerun with the checkpoint's values, or train on with this run's: --checkpoint.override=optim.lr") in refused.stderr  # fmt: skip
    train(out, 1, *RUN, "--optim.lr=1e-3", "--checkpoint.override=optim.lr")
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ours[:4]] == [r["loss"] for r in theirs[:4]] and ours[4]["loss"] == theirs[4]["loss"]
    assert [r["lr"] for r in ours[4:]] == pytest.approx([r["lr"] / 3 for r in theirs[4:]], rel=1e-12)  # same schedule, new peak
    assert ours[5]["loss"] != theirs[5]["loss"]
    assert json.loads((root / "step-00000008" / "train_state.json").read_text())["settings"]["optim.lr"] == 1e-3


def test_a_fallback_to_a_checkpoint_made_with_other_settings_exits_2(references, tmp_path):
    """The preflight reads the newest train state without verifying it; when that checkpoint then
    fails verification and the one resumed from was made with another lr, the refusal is still one
    line and exit code 2, not a traceback from inside the process group."""
    reference = references(1)
    out = tmp_path / "run"
    root = _copy(reference, out, keep_to=5)
    state_file = root / "step-00000005" / "train_state.json"
    state = json.loads(state_file.read_text())
    state["settings"]["optim.lr"] = 1e-3  # what the preflight sees; the manifest no longer verifies
    state_file.write_text(json.dumps(state))
    refused = _train_py(out, "--optim.lr=1e-3")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"set aside as {root}/set-aside/step-00000005." in refused.stderr
    assert f"error: {root}/step-00000004 was made with other optimizer/schedule settings (optim.lr: 0.003 there, 0.001 here)" in refused.stderr
