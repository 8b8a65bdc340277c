"""Packing: packed == separate (loss and every gradient), isolation, budgets, rank balance, 1 rank == N ranks."""

import random

import pytest
import torch

from limo.data.chat import IGNORE
from limo.data.dataset import EncodedSample
from limo.data.packing import CostModel, build_step, dummy, pack, plan
from limo.model.qwen2 import PRESETS, ModelArgs, build_model
from tests.conftest import rel_err

VOCAB = 203
ARGS = ModelArgs(vocab_size=VOCAB, hidden_size=48, intermediate_size=100, num_layers=2, num_heads=6, num_kv_heads=2, rope_theta=10000.0)


def random_model(seed=0, dtype=torch.float64):
    """A small Qwen2 with every weight random (norms and biases included), so every gradient is exercised."""
    torch.manual_seed(seed)
    model = build_model(ARGS, device="cpu", dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    return model


def make_sample(index, length, prompt, seed, supervised=True):
    """A conversation-like sample: `prompt` unsupervised tokens, then a supervised reply (unless not)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (length,), generator=g, dtype=torch.int32)
    labels = ids.clone()
    labels[:prompt] = IGNORE
    if not supervised:
        labels[:] = IGNORE
    return EncodedSample(ids, labels, index, f"s{index}")


# odd lengths, a one-token sample, and a sample with nothing supervised
SAMPLES = [
    make_sample(0, 37, 11, 1),
    make_sample(1, 1, 0, 2),
    make_sample(2, 19, 4, 3),
    make_sample(3, 64, 30, 4, supervised=False),
    make_sample(4, 23, 0, 5),
]


def textbook_loss(model, sample):
    """Causal LM loss of one sample alone: logits[t] scored against labels[t + 1], summed."""
    ids = sample.input_ids.long()
    logits = model.logits(model(ids))  # [L, V]
    return torch.nn.functional.cross_entropy(logits[:-1], sample.labels[1:].long(), ignore_index=IGNORE, reduction="sum")


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def run_packed(model, micro_batches):
    model.zero_grad()
    total = sum(model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, labels=mb.labels) for mb in micro_batches)
    total.backward()
    return total.detach(), grads(model)


def test_stream_layout_and_shifted_labels():
    mb = pack(SAMPLES)
    lengths = [len(s) for s in SAMPLES]
    assert mb.cu_seqlens.tolist() == [0, 37, 38, 57, 121, 144] and mb.cu_seqlens.dtype == torch.int32
    assert mb.max_seqlen == 64 and len(mb) == 144 and mb.sample_indices == [0, 1, 2, 3, 4]
    assert mb.position_ids.tolist() == [p for n in lengths for p in range(n)]
    assert mb.input_ids.dtype == mb.labels.dtype == mb.position_ids.dtype == torch.int64
    for s, start, end in zip(SAMPLES, mb.cu_seqlens[:-1].tolist(), mb.cu_seqlens[1:].tolist()):
        assert torch.equal(mb.input_ids[start:end], s.input_ids.long())
        assert mb.labels[start : end - 1].tolist() == s.labels[1:].tolist()  # target of t is the sample's own t + 1
        assert mb.labels[end - 1] == IGNORE  # never the next sample's first token
    assert mb.num_label_tokens == sum(s.num_label_tokens for s in SAMPLES) == int((mb.labels != IGNORE).sum())


def test_packed_equals_separate_for_loss_and_every_gradient():
    model = random_model()
    packed_loss, packed_grads = run_packed(model, [pack(SAMPLES)])
    model.zero_grad()
    separate = sum(textbook_loss(model, s) for s in SAMPLES)
    separate.backward()
    assert rel_err(packed_loss, separate.detach()) < 1e-12
    for name, g in grads(model).items():
        assert g.abs().max() > 0, name
        assert rel_err(packed_grads[name], g) < 1e-10, name


def test_changing_one_sample_leaves_the_others_unchanged():
    model = random_model(1)
    changed = list(SAMPLES)
    changed[2] = make_sample(2, 29, 3, 99)  # other tokens and another length: later samples move
    with torch.no_grad():
        outputs = [model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen) for mb in (pack(SAMPLES), pack(changed))]
    bounds = [pack(SAMPLES).cu_seqlens.tolist(), pack(changed).cu_seqlens.tolist()]
    for i in (0, 1, 3, 4):
        a = outputs[0][bounds[0][i] : bounds[0][i + 1]]
        b = outputs[1][bounds[1][i] : bounds[1][i + 1]]
        assert rel_err(b, a) < 1e-13, i
    assert not torch.allclose(outputs[0][38:57], outputs[1][38:67][:19])


def test_dummy_adds_nothing_to_loss_or_gradients():
    model = random_model(2)
    loss, dummy_grads = run_packed(model, [dummy()])
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in dummy_grads.values())
    assert dummy().num_label_tokens == 0 and dummy().sample_indices == [] and dummy().max_seqlen == 1


def _lengths(seed, n, low=50, high=16384):
    rng = random.Random(seed)
    return [min(high, max(low, int(rng.lognormvariate(8.3, 0.7)))) for _ in range(n)]


@pytest.mark.parametrize("world_size, budget, n", [(1, 16384, 32), (8, 16384, 32), (8, 16384, 17), (3, 20000, 40), (16, 16384, 5)])
def test_plan_places_every_sample_once_within_budget(world_size, budget, n):
    lengths = _lengths(world_size * 100 + n, n)
    result = plan(lengths, world_size, budget)
    assert len(result) == world_size
    placed = sorted(i for rank in result for micro in rank for i in micro)
    assert placed == list(range(n))
    assert all(sum(lengths[i] for i in micro) <= budget for rank in result for micro in rank)
    assert all(micro for rank in result for micro in rank)  # no empty micro-batch is ever planned
    assert plan(lengths, world_size, budget) == result  # deterministic


def test_plan_uses_the_fewest_micro_batches_when_they_fit():
    result = plan([4096] * 8, world_size=2, budget=16384)
    assert [len(rank) for rank in result] == [1, 1]
    result = plan([4096] * 9, world_size=2, budget=16384)
    assert sorted(len(rank) for rank in result) == [1, 2]


def test_balance_meets_the_greedy_bound_and_beats_a_contiguous_split():
    cost = CostModel()
    for seed in range(5):
        lengths = _lengths(seed, 32)
        costs = [cost(n) for n in lengths]
        # without a token constraint, largest-first greedy puts no rank above mean + the largest sample
        free = plan(lengths, 8, budget=10**9)
        rank_costs = [sum(costs[i] for m in rank for i in m) for rank in free]
        assert max(rank_costs) <= sum(costs) / 8 + max(costs)
        # with LIMO's budget it is at least as balanced as handing out contiguous slices of 4
        planned = [sum(costs[i] for m in rank for i in m) for rank in plan(lengths, 8, 16384)]
        contiguous = [sum(costs[4 * r : 4 * r + 4]) for r in range(8)]
        assert max(planned) <= max(contiguous)


def test_plan_rejects_samples_over_the_budget():
    with pytest.raises(ValueError, match=r"samples \(position, length\) \[\(1, 20000\)\] do not fit a micro-batch of 16384 tokens"):
        plan([100, 20000], 2, 16384)
    with pytest.raises(ValueError, match="rank=2 must lie in"):
        build_step(SAMPLES, world_size=2, rank=2, budget=128, epoch=0, step=0)


def test_every_rank_runs_the_same_number_of_micro_batches():
    samples = [make_sample(i, n, n // 3, i) for i, n in enumerate(_lengths(7, 13, high=300))]
    steps = [build_step(samples, world_size=4, rank=r, budget=600, epoch=1, step=3) for r in range(4)]
    counts = {len(s.micro_batches) for s in steps}
    assert len(counts) == 1
    for s in steps:
        assert all(len(mb) <= 600 for mb in s.micro_batches)
        assert (s.epoch, s.step, s.num_tokens, s.sample_indices) == (1, 3, sum(len(x) for x in samples), list(range(13)))
        assert s.rank_costs == steps[0].rank_costs and s.imbalance == max(s.rank_costs) / (sum(s.rank_costs) / 4)
    seen = sorted(i for s in steps for mb in s.micro_batches for i in mb.sample_indices)
    assert seen == list(range(13))
    assert sum(s.rank_tokens for s in steps) == steps[0].num_tokens
    assert sum(mb.num_label_tokens for s in steps for mb in s.micro_batches) == steps[0].num_label_tokens


def test_one_rank_equals_n_ranks():
    """The summed loss and gradients over all ranks' micro-batches equal the single-rank ones."""
    model = random_model(3)
    samples = [make_sample(i, n, n // 4, 50 + i) for i, n in enumerate([37, 5, 61, 1, 18, 44, 29, 9, 70])]
    one = build_step(samples, world_size=1, rank=0, budget=128, epoch=0, step=0)
    loss_one, grads_one = run_packed(model, one.micro_batches)
    ranks = [build_step(samples, world_size=3, rank=r, budget=128, epoch=0, step=0) for r in range(3)]
    assert {r.num_label_tokens for r in ranks} == {one.num_label_tokens}
    loss_n, grads_n = torch.zeros((), dtype=torch.float64), {n: torch.zeros_like(g) for n, g in grads_one.items()}
    for r in ranks:  # what the all-reduce adds up
        loss, g = run_packed(model, r.micro_batches)
        loss_n += loss
        for name in grads_n:
            grads_n[name] += g[name]
    assert rel_err(loss_n, loss_one) < 1e-12
    for name, g in grads_one.items():
        assert rel_err(grads_n[name], g) < 1e-10, name


def test_default_cost_ratio_is_qwen25_32b():
    exact = CostModel.for_model(PRESETS["qwen2.5-32b"])
    assert abs(exact.quadratic / exact.linear / CostModel().quadratic - 1) < 0.05
    assert exact(100) == exact.linear * 100 + exact.quadratic * 100**2


def test_micro_batch_moves_every_tensor():
    mb = pack(SAMPLES).to("meta")
    assert all(t.device.type == "meta" for t in (mb.input_ids, mb.labels, mb.position_ids, mb.cu_seqlens))
    assert mb.max_seqlen == 64 and mb.sample_indices == [0, 1, 2, 3, 4]
