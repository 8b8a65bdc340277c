"""Step 4, score: LIMO's four traits of a reasoning chain, and only chains with the right answer.

LIMO (Ye et al., "LIMO: Less is More for Reasoning", arXiv:2502.03387, v2 and later, section 3,
"Reasoning Chain Construction") scores chains by rules for four traits, each with a weight:

    elaborated reasoning   30%  the chain's length
    self-verification      20%  validation words ("check", "verify", ...)
    exploratory approach   25%  tentative words ("perhaps", "might", ...)
    adaptive granularity   25%  logical connectives ("therefore", "since", ...)

with every keyword count normalised by the chain's length. Provenance, plainly: the paper could
not be fetched from the machine this was written on, so the four weights are our reading of it,
checked against an independent public reimplementation of LIMO's scorer that gives the same
30/20/25/25 split and the same example keywords. Two choices are ours, since
the paper gives no formula for them: the keyword lists beyond the paper's examples (below), and
how length (a count) and frequencies (ratios) are put on one scale: each trait becomes its
percentile among the chains scored together (ties share the average rank), then the weights mix
the percentiles. A score is a deterministic function of the set of chains: same inputs, same scores.

Before any scoring, each chain's final answer (its last \\boxed{}) is graded against the record's
answer with eval.grading; a wrong or missing one removes the record as "wrong_answer".
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from limo.curate.records import mark_removed
from limo.eval.grading import grade
from limo.tools.errors import UserError

TRAITS = ("elaborated", "self_verification", "exploratory", "granularity")
DEFAULT_WEIGHTS = {"elaborated": 0.30, "self_verification": 0.20, "exploratory": 0.25, "granularity": 0.25}
KEYWORDS = {
    "self_verification": re.compile(r"\b(?:check\w*|double-check\w*|recheck\w*|verif\w*|confirm\w*|validat\w*)\b"),
    "exploratory": re.compile(r"\b(?:perhaps|might|maybe|possibly|alternatively|suppose|what if)\b"),
    "granularity": re.compile(r"\b(?:therefore|since|thus|hence|because|so|consequently|it follows)\b"),
}


def parse_weights(text: str) -> dict[str, float]:
    """"0.3,0.2,0.25,0.25" (in TRAITS order) -> weights; non-negative, not all zero."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(TRAITS) or min(values) < 0 or sum(values) == 0:
        raise UserError(f"--weights must be {len(TRAITS)} non-negative numbers, not all 0, for {', '.join(TRAITS)}; got {text!r}")
    return dict(zip(TRAITS, values))


def traits(chain: str) -> dict[str, float]:
    """Raw traits: length in words (whitespace-separated, formulas included), and each keyword
    family's count per word."""
    text = chain.lower()
    words = len(text.split())
    raw = {"elaborated": float(words)}
    for name, pattern in KEYWORDS.items():
        raw[name] = len(pattern.findall(text)) / words if words else 0.0
    return raw


def percentiles(values: list[float]) -> list[float]:
    """Each value's rank in [0, 1] (ties share their average rank; a single value is 0.5)."""
    if len(values) == 1:
        return [0.5]
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 / (len(values) - 1)
        i = j + 1
    return ranks


def _right(e: dict) -> tuple[str | None, bool]:
    """(the chain's extracted answer, whether it is the record's): a record without one has no right chain."""
    return grade(e["chain"], [e["answer"]] if e["answer"] not in (None, "") else [])


def score_chains(pool: list[dict], weights: dict[str, float] = DEFAULT_WEIGHTS, threads: int = os.cpu_count() or 2
          ) -> tuple[list[dict], list[dict], dict]:
    """(kept with `score` and `traits`, removed as wrong_answer, stats)."""
    with ThreadPoolExecutor(threads) as pool_threads:
        verdicts = list(pool_threads.map(_right, pool))
    right = [e for e, (_, ok) in zip(pool, verdicts) if ok]
    gone = [mark_removed(e, "wrong_answer", extracted=pred) for e, (pred, ok) in zip(pool, verdicts) if not ok]
    raw = [traits(e["chain"]) for e in right]
    ranks = {name: percentiles([r[name] for r in raw]) for name in TRAITS} if right else {}
    total = sum(weights.values())
    kept = []
    for i, e in enumerate(right):
        value = sum(weights[name] * ranks[name][i] for name in TRAITS) / total
        kept.append({**e, "score": round(value, 6), "traits": {k: round(v, 6) for k, v in raw[i].items()}})
    stats = {"records": len(pool), "kept": len(kept), "wrong_answer": len(gone), "weights": weights}
    return kept, gone, stats
