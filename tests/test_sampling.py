"""The device sampler: distributions of temperature / top-k / top-p sampling, greedy, seeds."""

import math

import pytest
import torch

from limo.eval.sampler.sampling import M32, Sampler, mix32, noise_key, top_k_top_p
from limo.eval.sampler.sequence import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 0.3, -0.4, 1.0, -2.0])


def _sample(logits, n, temperature=1.0, top_k=0, top_p=1.0, seed=0, position=0):
    """n draws from one row of logits: n rows with the keys of n different seeds."""
    V = logits.shape[-1]
    sampler = Sampler(V, torch.device("cpu"))
    keys = torch.tensor([noise_key(seed + i, 0, position) for i in range(n)])
    return sampler(
        logits.expand(n, V), torch.full((n,), temperature), torch.full((n,), top_p), torch.full((n,), top_k, dtype=torch.long),
        keys, all_greedy=temperature == 0, filtered=top_k > 0 or top_p < 1,
    )  # fmt: skip


def _check_frequencies(tokens, probs):
    n = len(tokens)
    freq = torch.bincount(tokens, minlength=len(probs)).double() / n
    for f, p in zip(freq.tolist(), probs.tolist()):
        sigma = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(f - p) <= 5 * sigma + 1e-12, (freq, probs)


def test_temperature_sampling_follows_softmax():
    tokens = _sample(LOGITS, 40_000, temperature=0.7)
    _check_frequencies(tokens, (LOGITS.double() / 0.7).softmax(-1))


def test_top_k_and_top_p_renormalise_the_kept_tokens():
    p = LOGITS.double().softmax(-1)  # best first: 0 (.441), 1 (.268), 4 (.162), 2 (.081), 3 (.040), 5 (.008)
    keep = torch.zeros(6, dtype=torch.bool)
    keep[[0, 1]] = True
    _check_frequencies(_sample(LOGITS, 20_000, top_k=2), torch.where(keep, p, 0) / p[keep].sum())
    _check_frequencies(_sample(LOGITS, 20_000, top_p=0.7), torch.where(keep, p, 0) / p[keep].sum())  # .441 + .268 >= .7
    keep[4] = True  # top_p 0.75: .441 + .268 = .709 < .75, so the third-best joins
    _check_frequencies(_sample(LOGITS, 20_000, top_p=0.75), torch.where(keep, p, 0) / p[keep].sum())
    # top-p over the top-k renormalised: top_k=3 gives {0: .506, 1: .307, 4: .186}; top_p=0.75 keeps 0 and 1
    keep[4] = False
    _check_frequencies(_sample(LOGITS, 20_000, top_k=3, top_p=0.75), torch.where(keep, p, 0) / p[keep].sum())


def test_top_k_one_and_temperature_zero_are_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1003, generator=g) * 3  # vocab not a multiple of any block
    sampler = Sampler(1003, torch.device("cpu"))
    keys = torch.randint(0, 2**32, (64,), generator=g)
    ones = torch.ones(64)
    greedy = logits.argmax(-1)
    top1 = sampler(logits, 1.3 * ones, ones, torch.ones(64, dtype=torch.long), keys, all_greedy=False, filtered=True)
    assert torch.equal(top1, greedy)
    temps = torch.where(torch.arange(64) % 2 == 0, 0.0, 1.0)  # even rows greedy, odd rows sampled
    mixed = sampler(logits, temps, 0.5 * ones, torch.full((64,), 5), keys, all_greedy=False, filtered=True)
    assert torch.equal(mixed[::2], greedy[::2]) and not torch.equal(mixed[1::2], greedy[1::2])
    assert torch.equal(sampler(logits, 0 * ones, ones, 0 * keys, keys, all_greedy=True, filtered=False), greedy)


def test_a_row_depends_only_on_its_own_key_and_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 211, generator=g)
    sampler = Sampler(211, torch.device("cpu"))
    keys = torch.tensor([noise_key(7, j, 100 + j) for j in range(16)])
    args = (torch.full((16,), 0.9), torch.full((16,), 0.95), torch.full((16,), 50))
    full = sampler(logits, *args, keys, all_greedy=False, filtered=True)
    perm = torch.randperm(16, generator=g)
    shuffled = sampler(logits[perm], *(a[perm] for a in args), keys[perm], all_greedy=False, filtered=True)
    assert torch.equal(shuffled, full[perm])
    alone = sampler(logits[3:4], *(a[3:4] for a in args), keys[3:4], all_greedy=False, filtered=True)
    assert alone.item() == full[3].item()
    other = sampler(logits, *args, keys + 1, all_greedy=False, filtered=True)
    assert not torch.equal(other, full)


def test_noise_hash_is_exact_and_uniform():
    xs = [0, 1, 2, 12345, M32 - 1, M32]
    assert mix32(torch.tensor(xs)).tolist() == [mix32(x) for x in xs]
    assert all(0 <= mix32(x) <= M32 for x in xs)
    sampler = Sampler(100_003, torch.device("cpu"))
    noise = sampler.gumbel(torch.tensor([noise_key(0, 0, 0), noise_key(0, 0, 1)]))
    assert noise.isfinite().all()
    assert abs(noise.mean().item() - 0.5772) < 0.02 and abs(noise.var().item() - math.pi**2 / 6) < 0.05  # Gumbel(0, 1)
    keys = [noise_key(1, 0, 5), noise_key(1, 1, 5), noise_key(1, 0, 6), noise_key(2**40 + 1, 0, 5)]
    assert len(set(keys)) == len(keys)  # seed, sample index and position all enter the key


def test_top_k_top_p_keeps_the_best_token_always():
    x = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    out = top_k_top_p(x, torch.tensor([0, 0]), torch.tensor([1e-6, 1e-6]))
    assert out.isfinite().sum().item() == 2 and out[0, 0] == 5 and out[1, 2] == 9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n=0"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_stop():
    assert SamplingParams(stop="###").stop == ("###",) and SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_batched_noise_keys_equal_the_scalar_hash():
    from limo.eval.sampler.sampling import noise_keys

    seeds = [0, 1, 2**32 - 1, 2**32, 2**40 + 7, 2**63 + 5, 2**64 - 1]
    rows = [(seed, j, pos) for seed in seeds for j in (0, 3, 2**31) for pos in (0, 1, 37, 2**31 + 9)]
    hi = torch.tensor([s >> 32 for s, _, _ in rows])
    lo = torch.tensor([s & M32 for s, _, _ in rows])
    got = noise_keys(hi, lo, torch.tensor([j for _, j, _ in rows]), torch.tensor([p for _, _, p in rows]))
    assert got.tolist() == [noise_key(s, j, p) for s, j, p in rows]
