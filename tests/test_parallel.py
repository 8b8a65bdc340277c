"""The FSDP2 plan on CPU processes: sharded == unsharded, and world-size-independent init."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from limo.engine.config import ParallelConfig
from limo.engine.distributed import init_distributed
from limo.engine.sharding import parallelize
from limo.model.init import materialize
from limo.model.qwen2 import PRESETS, ModelArgs, build_model, clean_name
from limo.model.weights import HFCheckpoint, load_pretrained
from tests import distributed
from tests.conftest import random_hf_qwen2, rel_err

LENGTHS = [9, 4, 13, 6, 11, 3]  # six samples; rank r takes samples r, r + world, ...


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS]
    labels = []
    for ids in samples:
        lab = ids.roll(-1).clone()
        lab[-1] = -100
        lab[: len(ids) // 3] = -100  # an unsupervised prompt
        labels.append(lab)
    return samples, labels


def _pack(ids_list, labels_list):
    cu = torch.tensor([0] + torch.tensor([len(t) for t in ids_list]).cumsum(0).tolist(), dtype=torch.int32)
    return torch.cat(ids_list), torch.cat(labels_list), cu


def _sharded_grads(rank, world, folder, out, ac):
    d = init_distributed("cpu", 1)
    ckpt = HFCheckpoint(folder)
    model = build_model(ckpt.args, device="meta")
    parallelize(model, d.mesh, ParallelConfig(activation_checkpointing=ac, prefetch=1), param_dtype=torch.float32)
    materialize(model, d.device, ckpt)
    samples, labels = _batch(ckpt.args.vocab_size)
    n_global = sum(int((lab != -100).sum()) for lab in labels)
    ids, lab, cu = _pack(samples[rank::world], labels[rank::world])
    loss = model(ids, cu_seqlens=cu, labels=lab)
    (loss / n_global).backward()
    grads = {clean_name(n): p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in grads.items()}, out)


@pytest.mark.parametrize("world, tied, ac", [(2, False, "full"), (2, True, "selective"), (3, False, "none")])
def test_first_step_gradients_equal_the_unsharded_model(tmp_path, world, tied, ac):
    hf = random_hf_qwen2(seed=21, tie_word_embeddings=tied, num_hidden_layers=3)
    hf.save_pretrained(tmp_path / "hf")
    distributed.run(_sharded_grads, world, str(tmp_path / "hf"), str(tmp_path / "grads.safetensors"), ac)

    ref = load_pretrained(tmp_path / "hf")
    samples, labels = _batch(ref.args.vocab_size)
    ids, lab, cu = _pack(samples, labels)
    n_global = int((lab != -100).sum())
    (ref(ids, cu_seqlens=cu, labels=lab) / n_global).backward()
    got = load_file(tmp_path / "grads.safetensors")
    assert set(got) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        assert rel_err(got[name], p.grad) < 1e-5, name


def _seeded_init(rank, world, out):
    d = init_distributed("cpu", 1)
    args = ModelArgs(**{**PRESETS["tiny"].__dict__, "vocab_size": 1037, "num_layers": 2})  # rows not divisible by 2 or 3
    model = build_model(args, device="meta")
    parallelize(model, d.mesh, ParallelConfig(activation_checkpointing="none"), param_dtype=torch.float32)
    materialize(model, d.device, seed=7)
    full = {clean_name(n): p.full_tensor().contiguous() for n, p in model.named_parameters()}
    if rank == 0:
        save_file(full, out)


def test_seeded_init_does_not_depend_on_world_size(tmp_path):
    distributed.run(_seeded_init, 1, str(tmp_path / "w1.safetensors"))
    distributed.run(_seeded_init, 3, str(tmp_path / "w3.safetensors"))
    one, three = load_file(tmp_path / "w1.safetensors"), load_file(tmp_path / "w3.safetensors")
    assert one.keys() == three.keys()
    for name in one:
        assert torch.equal(one[name], three[name]), name
    assert one["embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(one["norm.weight"], torch.ones(128)) and torch.equal(one["layers.0.self_attn.q_proj.bias"], torch.zeros(128))


def _startup(rank, world, root, local_ranks):
    import json
    import time
    from pathlib import Path

    os.environ["LOCAL_RANK"] = str(local_ranks[rank])  # two "nodes": ranks 0, 1 and ranks 2, 3
    d = init_distributed("cpu", 1)
    root = Path(root)
    with d.node_leaders_first():  # a leader's "download" is done before its node's others start
        if d.local_rank == 0:
            time.sleep(0.5)
            (root / f"node-{rank}").write_text("fetched")
        else:
            leader = rank - d.local_rank
            assert (root / f"node-{leader}").read_text() == "fetched"
    d.check_shared_folder(root / "shared")  # one folder for all: passes
    try:
        d.check_shared_folder(root / f"rank-{rank}")  # a folder per rank, as on unshared node-local disks
        outcome = "passed"
    except RuntimeError as e:
        outcome = str(e)
    (root / f"outcome-{rank}.json").write_text(json.dumps(outcome))


def test_startup_fetches_once_per_node_and_needs_a_shared_output_dir(tmp_path):
    import json

    distributed.run(_startup, 4, str(tmp_path), [0, 1, 0, 1])
    outcomes = [json.loads((tmp_path / f"outcome-{r}.json").read_text()) for r in range(4)]
    assert all(f"rank-{r} is not one folder for every rank" in o for r, o in enumerate(outcomes)), outcomes  # every rank stops
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == []  # the probe is cleaned up


def test_a_world_of_one_leaves_the_environment_to_its_children(monkeypatch):
    """Outside torchrun, init_distributed makes a world of one without writing RANK or a rendezvous
    into os.environ: a child process (the evaluation, a test's plain train.py) inherited them and
    joined a stale rendezvous (EADDRINUSE, or MASTER_ADDR missing)."""
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    try:
        world = init_distributed("cpu", 1)
        assert dist.is_initialized() and (world.rank, world.world_size, world.local_rank) == (0, 1, 0)
        assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # the tests after this one start groups of their own
