"""One global batch of samples -> per-rank lists of packed micro-batches.

A micro-batch is one 1-D stream: samples laid end to end, `cu_seqlens` marking their bounds
(attention never crosses them), positions restarting at 0 in each sample, and labels shifted
*within* each sample, so the last token of a sample predicts nothing (-100) rather than the
next sample's first token. No token of supervision is lost: each sample's supervised targets
are exactly those it has alone.

The split over data-parallel ranks balances estimated compute, cost(L) = a*L + b*L^2 (dense
layers are linear in the sample's length, causal attention quadratic), by largest-cost-first
assignment to the cheapest rank that still has room, with as few micro-batches per rank as the
token budget allows. Ranks that end up with fewer micro-batches get one-token dummies whose
labels are all -100, so every rank runs the same number of forward/backward passes and FSDP's
collectives line up; a dummy adds 0 to the loss and to every gradient.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from limo.data.chat import IGNORE
from limo.data.dataset import EncodedSample
from limo.model.flops import flop_coefficients
from limo.model.qwen2 import ModelArgs


@dataclass(frozen=True)
class CostModel:
    """Relative compute of one sample of length L: linear * L + quadratic * L**2.

    The default ratio is Qwen2.5-32B's (attention's 6*layers*heads*head_dim per token pair over
    6*non-embedding params per token, ~1e-5): at 16k tokens attention adds ~16% to a sample.
    """

    linear: float = 1.0
    quadratic: float = 1.0e-5

    @classmethod
    def for_model(cls, args: ModelArgs) -> CostModel:
        """A model's own training FLOPs per sample (limo/model/flops.py, the MFU formula's)."""
        return cls(*flop_coefficients(args))

    def __call__(self, length: int) -> float:
        return self.linear * length + self.quadratic * length * length


@dataclass
class MicroBatch:
    """One packed stream for one rank: one forward/backward pass."""

    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, shifted within each sample: labels[t] is the target of position t
    position_ids: torch.Tensor  # [T] int64, restarting at 0 in each sample
    cu_seqlens: torch.Tensor  # [n+1] int32
    max_seqlen: int  # longest sample, a host int so no kernel launch needs a device sync
    sample_indices: list[int] = field(default_factory=list)  # dataset indices, in stream order; [] for a dummy
    num_label_tokens: int = 0  # supervised targets in this stream

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn) -> MicroBatch:
        return replace(self, **{name: fn(getattr(self, name)) for name in ("input_ids", "labels", "position_ids", "cu_seqlens")})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> MicroBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies, so that `.to(cuda, non_blocking=True)` really overlaps compute."""
        return self._map(torch.Tensor.pin_memory)


@dataclass
class StepBatch:
    """What one rank runs for one optimizer step, with the global batch's totals."""

    micro_batches: list[MicroBatch]  # the same count on every rank
    epoch: int
    step: int  # 0-based global optimizer step
    num_label_tokens: int  # supervised targets of the whole global batch (all ranks): the loss divisor
    num_tokens: int  # tokens of the whole global batch
    seqlens: list[int]  # lengths of every sample of the global batch (attention FLOPs)
    sample_indices: list[int]  # dataset indices of the global batch, in the order they were drawn
    rank_tokens: int  # tokens this rank runs (dummies excluded)
    rank_costs: list[float]  # estimated compute of every rank
    imbalance: float  # max rank cost / mean rank cost (1.0 is perfect)


def pack(samples: Sequence[EncodedSample]) -> MicroBatch:
    """Lay samples end to end; an empty list gives the one-token dummy."""
    if not samples:
        return dummy()
    lengths = [len(s) for s in samples]
    end = torch.full((1,), IGNORE, dtype=torch.int32)
    return MicroBatch(
        input_ids=torch.cat([s.input_ids for s in samples]).long(),  # [T]
        labels=torch.cat([t for s in samples for t in (s.labels[1:], end)]).long(),  # [T], shifted per sample
        position_ids=torch.cat([torch.arange(n) for n in lengths]),  # [T]
        cu_seqlens=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),  # [n+1]
        max_seqlen=max(lengths),
        sample_indices=[s.index for s in samples],
        num_label_tokens=sum(s.num_label_tokens for s in samples),
    )


def dummy(token_id: int = 0) -> MicroBatch:
    """One token that predicts nothing: keeps a rank's pass count equal to the others' at no loss."""
    return MicroBatch(
        input_ids=torch.tensor([token_id], dtype=torch.int64),
        labels=torch.tensor([IGNORE], dtype=torch.int64),
        position_ids=torch.zeros(1, dtype=torch.int64),
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
        max_seqlen=1,
    )


def plan(lengths: Sequence[int], world_size: int, budget: int, cost: CostModel = CostModel()) -> list[list[list[int]]]:
    """Assign samples (by position in `lengths`) to ranks and micro-batches: plan[rank][micro] = [i, ...].

    Tries the fewest micro-batches per rank the token total allows, M, and raises M until
    every sample fits: largest cost first, each goes to the cheapest rank with a micro-batch
    that has room (the fullest such micro-batch, to keep the others open for long samples).
    Deterministic: ties break by index. Empty micro-batches are removed; ranks may differ in count.
    """
    if world_size < 1 or budget < 1:
        raise ValueError(f"world_size={world_size} and budget={budget} must be >= 1")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > budget or n < 1]
    if too_long:
        raise ValueError(f"samples (position, length) {too_long[:5]} do not fit a micro-batch of {budget} tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    micro = max(1, math.ceil(sum(lengths) / (world_size * budget)))
    while True:
        bins = [[[] for _ in range(micro)] for _ in range(world_size)]
        loads = [[0] * micro for _ in range(world_size)]
        costs = [0.0] * world_size
        for i in order:
            n = lengths[i]
            for r in sorted(range(world_size), key=lambda r: (costs[r], r)):
                room = [b for b in range(micro) if loads[r][b] + n <= budget]
                if room:
                    b = max(room, key=lambda b: (loads[r][b], -b))
                    bins[r][b].append(i)
                    loads[r][b] += n
                    costs[r] += cost(n)
                    break
            else:
                break
        else:
            return [[b for b in rank if b] for rank in bins]
        micro += 1


def build_step(
    samples: Sequence[EncodedSample], *, world_size: int, rank: int, budget: int, epoch: int, step: int, cost: CostModel = CostModel()
) -> StepBatch:
    """This rank's share of one global batch, packed, with the batch's totals."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    lengths = [len(s) for s in samples]
    assignment = plan(lengths, world_size, budget, cost)
    count = max(1, *(len(r) for r in assignment))  # at least one pass, even for an empty batch
    mine = [pack([samples[i] for i in group]) for group in assignment[rank]]
    mine += [dummy() for _ in range(count - len(mine))]
    rank_costs = [sum(cost(lengths[i]) for group in r for i in group) for r in assignment]
    mean = sum(rank_costs) / world_size
    return StepBatch(
        micro_batches=mine,
        epoch=epoch,
        step=step,
        num_label_tokens=sum(s.num_label_tokens for s in samples),
        num_tokens=sum(lengths),
        seqlens=lengths,
        sample_indices=[s.index for s in samples],
        rank_tokens=sum(lengths[i] for group in assignment[rank] for i in group),
        rank_costs=rank_costs,
        imbalance=max(rank_costs) / mean if mean > 0 else 1.0,
    )
