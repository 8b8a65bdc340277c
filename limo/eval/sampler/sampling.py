"""Token selection on the device: greedy, temperature, top-k, top-p, reproducible per-request seeds.

Sampling is Gumbel-max: argmax(logits / T + g) with g = -log(-log(u)) picks token v with
probability softmax(logits / T)[v]. The uniforms u come from a counter-based hash of
(seed, sample index, position, token id) rather than from a generator's state, so a sample
depends only on its own seed and logits: not on what else is in the batch, on how it was
scheduled, or on being preempted and recomputed. The hash is integer arithmetic on int64 values
kept below 2^32 (products below 2^59), so it is exact and identical on every device.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def mix32(x):
    """A 32-bit integer hash (two multiply-xorshift rounds) of an int or an int64 tensor in [0, 2^32)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def noise_key(seed: int, sample_index: int, position: int) -> int:
    """The 32-bit key of the noise that picks token `position` of sample `sample_index` under `seed`."""
    seed &= (1 << 64) - 1
    h = mix32((seed >> 32) ^ mix32(sample_index & M32 ^ mix32(position & M32)))
    return mix32(h ^ (seed & M32))


def noise_keys(seed_hi: torch.Tensor, seed_lo: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """noise_key for a whole batch at once, from the seeds' 32-bit halves ([B] int64 each): the
    same values, as one short chain of tensor ops instead of three Python hashes per row."""
    h = mix32(seed_hi ^ mix32(sample_index & M32 ^ mix32(position & M32)))
    return mix32(h ^ seed_lo)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_hash = mix32((torch.arange(vocab_size, dtype=torch.int64, device=device) + _GOLDEN) & M32)  # [V]

    def gumbel(self, keys: torch.Tensor) -> torch.Tensor:
        """[B] keys -> [B, V] standard Gumbel noise; u keeps 24 bits, so it is never 0 or 1 in float32."""
        bits = mix32(self.vocab_hash[None, :] ^ keys[:, None]) >> 8  # [B, V] in [0, 2^24)
        u = (bits.float() + 0.5) * 2.0**-24
        return -torch.log(-torch.log(u))

    @torch.no_grad()
    def __call__(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_p: torch.Tensor,
        top_k: torch.Tensor,
        keys: torch.Tensor,
        all_greedy: bool,
        filtered: bool,
    ) -> torch.Tensor:
        """logits [B, V] -> token ids [B] (int64). Rows with temperature 0 take the argmax.

        temperature, top_p [B] float32; top_k [B] int64 (0: off); keys [B] int64 from noise_key.
        `all_greedy` and `filtered` (some row has top_k > 0 or top_p < 1) are known on the host
        from the requests and skip the noise and the sort when no row needs them.
        """
        logits = logits.float()
        greedy = logits.argmax(-1)
        if all_greedy:
            return greedy
        x = logits / temperature.clamp(min=1e-5)[:, None]  # greedy rows are replaced below
        if filtered:
            x = top_k_top_p(x, top_k, top_p)
        sampled = (x + self.gumbel(keys)).argmax(-1)
        return torch.where(temperature > 0, sampled, greedy)


def top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what lies outside the k best, then outside the smallest set holding top_p of the rest.

    Top-p is taken over the distribution renormalised after top-k (as transformers and vLLM do);
    the best token always survives. The sort is stable, so top_k = 1 keeps exactly the argmax.
    """
    V = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)  # [B, V]
    ranks = torch.arange(V, device=x.device)
    k = torch.where(top_k > 0, top_k, V)
    sorted_x = sorted_x.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = sorted_x.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the better-ranked tokens
    cut = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    sorted_x = sorted_x.masked_fill(cut, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
