"""Context parallelism (parallel.cp) on CPU processes joined by gloo, fp32: the balanced split of a
packed micro-batch, and the loss and every gradient at cp = 2 and 4 equal to the whole
micro-batch on one process, within 1e-5. The micro-batch holds several documents: one crossing
every cut, one shorter than a chunk, one of a single token."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from limo.data.context import shard_for_cp
from limo.data.packing import MicroBatch
from limo.model.init import init_weights
from limo.model.qwen2 import ModelArgs, build_model
from tests import distributed
from tests.conftest import rel_err

ARGS = ModelArgs(vocab_size=211, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2, rope_theta=10000.0)
LENGTHS = [37, 3, 64, 1, 21]


def _micro_batch() -> MicroBatch:
    g = torch.Generator().manual_seed(0)
    ids, labels = [], []
    for n in LENGTHS:
        x = torch.randint(0, ARGS.vocab_size, (n,), generator=g)
        lab = x.roll(-1).clone()
        lab[-1] = -100
        lab[: n // 4] = -100  # an unsupervised prompt
        ids.append(x)
        labels.append(lab)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    labels_all = torch.cat(labels)
    return MicroBatch(torch.cat(ids), labels_all, positions, cu, max(LENGTHS), num_label_tokens=int((labels_all != -100).sum()))


def _model():
    torch.manual_seed(3)
    model = build_model(ARGS, device="cpu")
    init_weights(model)
    return model


def test_the_split_is_balanced_and_covers_every_token_once():
    mb = _micro_batch()
    for cp in (2, 3, 4):
        shards = [shard_for_cp(mb, cp, r) for r in range(cp)]
        assert len({len(s) for s in shards}) == 1  # equal token counts: what the all-gather needs
        assert sum(s.num_label_tokens for s in shards) == mb.num_label_tokens
        work = [sum((b - a) * (kb - ka) for a, b, ka, kb in zip(s.cu_q[:-1].tolist(), s.cu_q[1:].tolist(), s.cu_k[:-1].tolist(),
                                                                  s.cu_k[1:].tolist())) for s in shards]  # fmt: skip
        assert max(work) == min(work)  # front + back chunk: the same attention work on every rank
        real = sorted(t for s in shards for t in zip(s.position_ids[s.labels != -100].tolist(), s.labels[s.labels != -100].tolist()))
        want = sorted(zip(mb.position_ids[mb.labels != -100].tolist(), mb.labels[mb.labels != -100].tolist()))
        assert real == want


def _cp_grads(rank, world, out):
    from limo.engine.context import cp_loss

    dist.init_process_group("gloo")
    model = _model()
    mb = _micro_batch()
    shard = shard_for_cp(mb, world, rank)
    loss = cp_loss(model, shard, dist.group.WORLD)
    (loss / mb.num_label_tokens).backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # what FSDP's reduction does across the cp ranks
    if rank == 0:
        save_file({**{k: v.contiguous() for k, v in grads.items()}, "loss": total[None]}, out)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_loss_and_every_gradient_equal_one_process(tmp_path, cp):
    distributed.run(_cp_grads, cp, str(tmp_path / "grads.safetensors"))
    model = _model()
    mb = _micro_batch()
    loss = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, labels=mb.labels)
    (loss / mb.num_label_tokens).backward()
    got = load_file(tmp_path / "grads.safetensors")
    assert rel_err(got["loss"][0], loss.detach()) < 1e-6
    for name, p in model.named_parameters():
        assert rel_err(got[name], p.grad) < 1e-5, name


# ------------------------------------------------------------------------------------------
# limo/engine/train.py with parallel.cp under torchrun: the demo recipe made small (tests/test_train.py)


def test_training_at_cp_2_gives_the_reference_losses_and_resumes_after_kill_9(tmp_path):
    from tests.test_train import GOLDEN_LOSSES, losses, train

    out = tmp_path / "cp2"
    killed = train(out, 2, "--parallel.cp=2", crash_at="step:3", check=False)
    assert killed.returncode != 0 and (out / "checkpoints" / "step-00000002").is_dir()
    finished = train(out, 2, "--parallel.cp=2")
    assert "resumed from" in finished.stderr
    assert losses(out) == pytest.approx(GOLDEN_LOSSES, rel=1e-5)  # cp=2 (one data-parallel group) == the 2-rank data-parallel run


def test_dp_2_x_cp_2_gives_the_reference_losses(tmp_path):
    from tests.test_train import GOLDEN_LOSSES, losses, train

    train(tmp_path / "dp2cp2", 4, "--parallel.cp=2")
    assert losses(tmp_path / "dp2cp2") == pytest.approx(GOLDEN_LOSSES, rel=1e-5)


def test_a_cp_degree_that_does_not_divide_the_world_is_refused_before_any_process_group(tmp_path):
    from tests.test_train import train

    proc = train(tmp_path / "bad", 2, "--parallel.cp=3", check=False)
    assert proc.returncode != 0 and "parallel.cp=3 does not divide the world size 2" in proc.stderr
    assert "init_process_group" not in proc.stderr and not (tmp_path / "bad").exists()


def test_the_planner_fits_32k_at_cp_2_and_64k_at_cp_4_where_cp_1_does_not():
    from limo.engine.config import load_config
    from limo.engine.memory import H100_80GB_GIB, plan_memory
    from limo.model.qwen2 import PRESETS
    from tests.conftest import ROOT

    def peak(config, *overrides):
        return plan_memory(load_config(ROOT / "configs" / config, list(overrides)), PRESETS["qwen2.5-32b"], 8, H100_80GB_GIB)

    assert not peak("limo_qwen2.5_32b_32k_8xh100.toml", "--parallel.cp=1").fits
    for config in ("limo_qwen2.5_32b_32k_8xh100.toml", "limo_qwen2.5_32b_64k_8xh100.toml"):
        plan = peak(config)
        assert plan.fits and plan.peak_gib <= 77.1, (config, plan.peak_gib)
