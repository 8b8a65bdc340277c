"""When a sample ends, and the text it ends with: EOS ids, stop strings, max_tokens.

Stop strings are found in text, so they need the tokenizer. Each step decodes only a tail of the
sample that is long enough to hold any stop string (4 bytes per character at most, one byte per
byte-level token at least) instead of the whole sample, which would cost O(length^2) over a
32k-token answer. A match is looked for after every token, so the first one found is the first
in the text.
"""

from __future__ import annotations

from typing import Any

from limo.eval.sampler.sequence import Sequence


class StopChecker:
    def __init__(self, eos_token_ids: set[int] | frozenset[int], tokenizer: Any = None):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def __call__(self, seq: Sequence) -> str | None:
        """The finish reason of a sample whose last token was just appended, or None to go on."""
        params = seq.params
        if not params.ignore_eos and seq.token_ids[-1] in self.eos_token_ids:
            return "stop"
        if params.stop:
            window = 4 * max(len(s) for s in params.stop) + 4
            tail = self.decode(seq.generated[-window:])
            if any(s in tail for s in params.stop):
                return "stop"
        if seq.num_generated >= params.max_tokens:
            return "length"
        return None

    def text(self, seq: Sequence) -> str | None:
        """The generated text, cut before the first stop string; None without a tokenizer."""
        if self.tokenizer is None:
            return None
        text = self.decode(seq.generated)
        cuts = [i for s in seq.params.stop if (i := text.find(s)) >= 0]
        return text[: min(cuts)] if cuts else text
