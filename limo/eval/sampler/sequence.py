"""What one request asks for (SamplingParams) and one sample of it as the scheduler sees it (Sequence).

Pure Python, like the block manager and the scheduler, so their bookkeeping is tested without torch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from enum import Enum, auto


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: temperature 0 is greedy; top_k 0 and top_p 1 are off.

    `seed` makes the samples reproducible whatever else is in the batch (None: drawn from torch's
    global generator when the request is added). `n` samples per prompt share the prompt's
    prefill and its KV pages. `stop` strings end a sample (the text is cut before the match);
    EOS ids end it unless `ignore_eos`; `max_tokens` bounds the generated tokens.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] | list[str] | str = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            ("temperature", isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0,
             "a finite float >= 0 (0 is greedy)"),
            ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an int >= 0 (0 is off)"),
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an int >= 1"),
            ("seed", self.seed is None or _is_int(self.seed), "None or an int"),
            ("n", _is_int(self.n) and self.n >= 1, "an int >= 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a string or a sequence of non-empty strings"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a bool"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: must be {allowed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Status(Enum):
    WAITING = auto()  # not yet prefilled, or preempted (its pages freed; it will be recomputed)
    RUNNING = auto()  # holds pages for all its tokens but the last
    FINISHED = auto()


class Sequence:
    """One sample: prompt + generated tokens, the pages holding their K/V, and where it stands.

    A running sequence has K/V cached for all tokens but the last, which the next decode step
    feeds in. A prompt with n samples enters as one sequence with `num_forks = n`; when it is
    prefilled the scheduler forks it into n sequences that share its pages.
    """

    _ids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, seed: int, prompt_index: int, sample_index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.seed = seed
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.num_forks = params.n if sample_index == 0 else 1
        self.block_table: list[int] = []
        self.table_row = -1  # this sequence's row in the runner's persistent block tables while it runs
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        seed &= (1 << 64) - 1  # the noise key's halves, split once (sampling.noise_keys hashes them per step)
        self.seed_hi, self.seed_lo = seed >> 32, seed & 0xFFFFFFFF

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, prompt={self.prompt_index}, sample={self.sample_index}, {self.status.name}, "
                f"tokens={self.num_prompt_tokens}+{self.num_generated}, blocks={self.block_table})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def fork(self, sample_index: int) -> Sequence:
        """A sibling sample with the same tokens; the block manager shares the pages."""
        child = Sequence(self.token_ids, self.params, self.seed, self.prompt_index, sample_index)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.status = self.status
        return child
