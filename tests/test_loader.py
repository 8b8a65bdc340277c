"""The loader: every sample once per epoch, seeded order, 1 rank == N ranks, resumed == uninterrupted."""

import json
import random

import pytest
import torch

from limo.data.chat import IGNORE
from limo.data.dataset import EncodedSample, load_samples
from limo.data.loader import PackedLoader
from limo.engine.config import DataConfig
from tests.conftest import shared_path


def fake_samples(n, seed=0, high=900):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(2, high)
        ids = torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(i), dtype=torch.int32)
        labels = ids.clone()
        labels[: length // 3] = IGNORE
        out.append(EncodedSample(ids, labels, i, f"s{i}"))
    return out


SAMPLES = fake_samples(817)


def loader(world_size=1, rank=0, seed=0, epochs=3, samples=SAMPLES, **kw):
    return PackedLoader(
        samples, samples_per_step=32, tokens_per_microbatch=2048, epochs=epochs, world_size=world_size, rank=rank, seed=seed, **kw
    )


def global_batches(world_size, **kw):
    """(sample ids of the global batch, ids each rank ran, totals) per step, from all ranks."""
    per_rank = [list(loader(world_size, r, **kw)) for r in range(world_size)]
    out = []
    for steps in zip(*per_rank):
        assert len({len(s.micro_batches) for s in steps}) == 1  # collectives line up
        ran = sorted(i for s in steps for mb in s.micro_batches for i in mb.sample_indices)
        out.append((steps[0].sample_indices, ran, steps[0].num_label_tokens, steps[0].num_tokens, steps[0].seqlens))
    return out


def test_limo_schedule_keeps_the_partial_last_batch():
    lo = loader(epochs=15)
    assert (lo.steps_per_epoch, lo.total_steps, len(lo)) == (26, 390, 390)
    sizes = [len(lo.batch(s).sample_indices) for s in (0, 24, 25, 26)]
    assert sizes == [32, 32, 17, 32]


@pytest.mark.parametrize("world_size", [1, 3])
def test_each_sample_exactly_once_per_epoch(world_size):
    batches = global_batches(world_size, epochs=2)
    for epoch in range(2):
        chosen = [i for ids, ran, *_ in batches[26 * epoch : 26 * (epoch + 1)] for i in ids]
        assert sorted(chosen) == list(range(817))
    for ids, ran, label_tokens, tokens, seqlens in batches:
        assert ran == sorted(ids)  # each chosen sample runs on exactly one rank, in exactly one micro-batch
        assert label_tokens == sum(SAMPLES[i].num_label_tokens for i in ids)
        assert tokens == sum(seqlens) and seqlens == [len(SAMPLES[i]) for i in ids]


def test_one_rank_and_n_ranks_see_the_same_global_batches():
    one = global_batches(1, epochs=2)
    for world_size in (2, 5):
        assert global_batches(world_size, epochs=2) == one


def test_budget_holds_on_every_micro_batch():
    for step in loader(world_size=4, rank=1):
        assert all(len(mb) <= 2048 and mb.max_seqlen == max(mb.cu_seqlens.diff().tolist()) for mb in step.micro_batches)


def test_same_seed_same_batches_other_seed_or_epoch_differs():
    a = [s.sample_indices for s in loader(seed=7, epochs=2)]
    assert a == [s.sample_indices for s in loader(seed=7, epochs=2)]
    assert a != [s.sample_indices for s in loader(seed=8, epochs=2)]
    assert a[:26] != a[26:]  # each epoch has its own order


def _same(x, y):
    assert (x.epoch, x.step, x.sample_indices, x.num_label_tokens) == (y.epoch, y.step, y.sample_indices, y.num_label_tokens)
    assert len(x.micro_batches) == len(y.micro_batches)
    for a, b in zip(x.micro_batches, y.micro_batches):
        for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("stop", [1, 13, 26, 40])  # mid-epoch, an epoch boundary, mid second epoch
def test_resumed_mid_run_continues_exactly(stop):
    full = list(loader(world_size=2, rank=1))
    first = loader(world_size=2, rank=1)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # plain Python values survive any checkpoint format
    resumed = loader(world_size=2, rank=1)
    resumed.load_state_dict(state)
    assert resumed.step == stop and len(resumed) == len(full) - stop
    for x, y in zip(head + list(resumed), full, strict=True):
        _same(x, y)


def test_resume_on_another_world_size_keeps_the_global_batches():
    first = loader(world_size=4, rank=0)
    it = iter(first)
    for _ in range(30):
        next(it)
    resumed = loader(world_size=1, rank=0)
    resumed.load_state_dict(first.state_dict())
    want = list(loader(world_size=1, rank=0))[30:]
    for x, y in zip(resumed, want, strict=True):
        _same(x, y)


def test_state_from_other_data_or_seed_is_refused():
    state = loader().state_dict()
    with pytest.raises(ValueError, match="loader state seed=0 but this loader has seed=1"):
        loader(seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="loader state num_samples=817 but this loader has num_samples=816"):
        loader(samples=SAMPLES[:-1]).load_state_dict(state)
    other = list(SAMPLES)
    other[5] = fake_samples(6, seed=1)[5]
    with pytest.raises(ValueError, match="fingerprint=.* resuming would change the data order"):
        loader(samples=other).load_state_dict(state)
    with pytest.raises(ValueError, match=r"loader state lacks \['fingerprint'\]"):
        loader().load_state_dict({k: v for k, v in state.items() if k != "fingerprint"})
    with pytest.raises(ValueError, match="position epoch=3, step_in_epoch=5 is outside this run"):
        loader().load_state_dict({**state, "epoch": 3, "step_in_epoch": 5})


def test_constructor_errors_name_the_problem():
    with pytest.raises(ValueError, match="sample s3 has 3000 tokens, more than tokens_per_microbatch=2048"):
        loader(samples=SAMPLES[:3] + [EncodedSample(torch.ones(3000, dtype=torch.int32), torch.ones(3000, dtype=torch.int32), 3, "s3")])
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, world_size=2\)"):
        loader(world_size=2, rank=2)
    with pytest.raises(ValueError, match="samples_per_step=0 must be >= 1"):
        PackedLoader(SAMPLES, samples_per_step=0, tokens_per_microbatch=2048, epochs=1)
    with pytest.raises(IndexError, match=r"step 78 is outside \[0, total_steps=78\)"):
        loader().batch(78)


def test_real_limo_format_data_end_to_end(tmp_path):
    """MATH problems as LIMO records, the Qwen2.5 tokenizer, 1 and 4 ranks: identical global batches."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared_path("data", "tokenizers", "qwen2.5")))
    path = tmp_path / "limo.jsonl"
    with shared_path("data", "eval", "math", "test.jsonl").open() as f, path.open("w") as out:
        for line in list(f)[:120]:
            row = json.loads(line)
            out.write(json.dumps({"question": row["problem"], "solution": row["solution"], "answer": row["answer"]}) + "\n")
    cfg = DataConfig(path=str(path), max_tokens=600, tokens_per_microbatch=1200, samples_per_step=32)
    samples, report = load_samples(cfg, tokenizer)
    assert report.records == 120 and report.samples + report.dropped == 120 and report.overlong == report.dropped
    runs = {}
    for world_size in (1, 4):
        loaders = [
            PackedLoader(samples, samples_per_step=32, tokens_per_microbatch=1200, epochs=2, world_size=world_size, rank=r)
            for r in range(world_size)
        ]
        steps = [list(lo) for lo in loaders]
        runs[world_size] = [(s[0].sample_indices, s[0].num_label_tokens) for s in zip(*steps)]
        for per_rank in zip(*steps):
            assert len({len(s.micro_batches) for s in per_rank}) == 1
            supervised = sum(int((mb.labels != IGNORE).sum()) for s in per_rank for mb in s.micro_batches)
            assert supervised == per_rank[0].num_label_tokens  # no token of supervision lost in packing
    assert runs[1] == runs[4] and len(runs[1]) == 2 * -(-len(samples) // 32)
