"""Deterministic, rank-aware, resumable iteration over global batches of packed samples.

The order of an epoch is a permutation drawn from (seed, epoch) alone, and global batch k of
the epoch is samples k*S .. k*S+S-1 of it (the last one may be partial: LIMO's 817 samples at
32 per step are 25 full steps and one of 17). Nothing here depends on the world size except
the split of each global batch over ranks, so 1 rank and N ranks train on the same batches and
a run may resume on a different number of ranks. Because the order is a pure function of the
seed and the epoch, the loader's whole state is its position (epoch, step within the epoch)
plus the seed and a fingerprint of the data it was built on, all plain Python values.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from limo.data.dataset import EncodedSample
from limo.data.packing import CostModel, StepBatch, build_step

STATE_KEYS = ("epoch", "step_in_epoch", "seed", "num_samples", "samples_per_step", "fingerprint")


class PackedLoader:
    def __init__(
        self,
        samples: Sequence[EncodedSample],
        *,
        samples_per_step: int,
        tokens_per_microbatch: int,
        epochs: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        cost: CostModel = CostModel(),
    ):
        if not samples:
            raise ValueError("PackedLoader needs at least one sample")
        sizes = dict(samples_per_step=samples_per_step, tokens_per_microbatch=tokens_per_microbatch, epochs=epochs, world_size=world_size)
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        longest = max(samples, key=len)
        if len(longest) > tokens_per_microbatch:
            name = longest.where or longest.index
            raise ValueError(f"sample {name} has {len(longest)} tokens, more than tokens_per_microbatch={tokens_per_microbatch}")
        self.samples = list(samples)
        self.samples_per_step, self.budget, self.epochs = samples_per_step, tokens_per_microbatch, epochs
        self.world_size, self.rank, self.seed, self.cost = world_size, rank, seed, cost
        self.steps_per_epoch = math.ceil(len(self.samples) / samples_per_step)
        self.total_steps = epochs * self.steps_per_epoch
        lengths = np.array([len(s) for s in self.samples] + [s.num_label_tokens for s in self.samples], dtype=np.int64)
        self.fingerprint = zlib.crc32(lengths.tobytes())
        self.epoch, self.step_in_epoch = 0, 0
        self._order: tuple[int, list[int]] | None = None

    @property
    def step(self) -> int:
        """The global step the next batch will carry."""
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def order(self, epoch: int) -> list[int]:
        """The epoch's sample order, a permutation seeded by (seed, epoch) only."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.samples)).tolist())
        return self._order[1]

    def batch(self, step: int) -> StepBatch:
        """This rank's share of global step `step` (random access; does not move the position)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside [0, total_steps={self.total_steps})")
        epoch, k = divmod(step, self.steps_per_epoch)
        chosen = self.order(epoch)[k * self.samples_per_step : (k + 1) * self.samples_per_step]
        samples = [self.samples[i] for i in chosen]
        return build_step(samples, world_size=self.world_size, rank=self.rank, budget=self.budget, epoch=epoch, step=step, cost=self.cost)

    def __len__(self) -> int:
        """Steps left from the current position."""
        return self.total_steps - self.step

    def __iter__(self) -> Iterator[StepBatch]:
        """Continue from the current position; the position moves past a batch as it is handed out."""
        while self.step < self.total_steps:
            batch = self.batch(self.step)
            self.epoch, self.step_in_epoch = divmod(self.step + 1, self.steps_per_epoch)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "num_samples": len(self.samples),
            "samples_per_step": self.samples_per_step,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; the data, seed and batch size must be the ones it was saved with."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}; it has {sorted(state)}")
        mine = self.state_dict()
        for key in ("seed", "num_samples", "samples_per_step", "fingerprint"):
            if int(state[key]) != mine[key]:
                raise ValueError(
                    f"loader state {key}={state[key]} but this loader has {key}={mine[key]}: resuming would change the data order"
                )
        epoch, k = int(state["epoch"]), int(state["step_in_epoch"])
        if not 0 <= k < self.steps_per_epoch or not 0 <= epoch * self.steps_per_epoch + k <= self.total_steps:
            run = f"{self.epochs} epochs of {self.steps_per_epoch} steps"
            raise ValueError(f"loader state position epoch={epoch}, step_in_epoch={k} is outside this run ({run})")
        self.epoch, self.step_in_epoch = epoch, k
