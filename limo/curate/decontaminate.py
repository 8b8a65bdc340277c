"""Step 2, decontaminate: drop pool problems that are evaluation problems, however rewritten.

The evaluation suites are every `<dir>/<name>/test.jsonl` under --eval-dir (default
../shared/data/eval: LIMO's ten benchmarks); a removal names the folder. After the shared
normalisation (limo/curate/text.py: whitespace, math delimiters, number formats, a "Problem 7."
label and the opening verb), two tests run, and either catches:

- long n-grams: the share of 8-token n-grams the pool problem has in common with one evaluation
  problem, out of the shorter one's n-grams. >= `overlap` (0.5) with at least 2 shared n-grams
  is contamination: an evaluation problem with a sentence added, one reworded or its options
  shuffled still shares most of its 8-grams. N-grams found in more than 5 evaluation problems
  (GPQA's instruction, "put your final answer in ...") are boilerplate and not counted.
- similarity, for problems too short for 8-grams to say much: Jaccard similarity of the token
  bigram sets >= `similarity` (0.6), and the same numbers in both (a problem with other numbers
  is another problem). Candidates come from MinHash LSH and are verified exactly.

The evidence travels with the removal: `benchmark`, `match` (the evaluation problem's id and
opening words) and `overlap` or `similarity`. Cost: linear in the pool (a few dictionary lookups
per n-gram, one LSH query per problem) after indexing the suites once.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from limo.curate.records import mark_removed
from limo.curate.text import jaccard, lsh_index, minhashes, ngrams, numbers, tokens
from limo.tools.errors import UserError

NGRAM = 8
BOILERPLATE_ITEMS = 5
MIN_SHARED = 2
SHINGLE = 2
DEFAULT_OVERLAP = 0.5
DEFAULT_SIMILARITY = 0.6
_CANDIDATE_THRESHOLD = 0.4  # LSH's recall threshold, below the verified one
_QUESTION_KEYS = ("problem", "question", "Question", "prompt", "instruction", "input")
_ID_KEYS = ("id", "unique_id", "idx", "Record ID")


@dataclass
class EvalItem:
    benchmark: str
    id: str
    text: str
    grams: set[str]
    shingles: set[str]
    numbers: tuple[str, ...]


def load_suites(eval_dir: Path) -> list[EvalItem]:
    """Every problem of every `<eval_dir>/<name>/test.jsonl`, named by its folder."""
    files = sorted(eval_dir.glob("*/test.jsonl"))
    if not files:
        raise FileNotFoundError(f"--eval-dir {eval_dir}: no <benchmark>/test.jsonl files (LIMO's layout)")
    items = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                text = next((record[k] for k in _QUESTION_KEYS if isinstance(record.get(k), str) and record[k].strip()), None)
                if text is None:
                    raise KeyError(f"{path}:{lineno}: none of {list(_QUESTION_KEYS)} holds the problem (keys: {sorted(record)})")
                pid = next((str(record[k]) for k in _ID_KEYS if record.get(k) is not None), str(lineno))
                toks = tokens(text)
                items.append(EvalItem(path.parent.name, pid, " ".join(text.split())[:160], ngrams(toks, NGRAM) if len(toks) >= NGRAM
                                      else set(), ngrams(toks, SHINGLE), numbers(toks)))
    return items


class Index:
    """The suites' n-grams (boilerplate left out) and a MinHash LSH over their bigram sets."""

    def __init__(self, items: list[EvalItem]):
        self.items = items
        counts = Counter(g for item in items for g in item.grams)
        self.by_gram: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            item.grams = {g for g in item.grams if counts[g] <= BOILERPLATE_ITEMS}
            for g in item.grams:
                self.by_gram[g].append(i)
        self.signatures = minhashes(item.shingles for item in items)
        self.lsh = lsh_index(self.signatures, _CANDIDATE_THRESHOLD)

    def match(self, question: str, signature, overlap: float, similarity: float) -> dict | None:
        """The best evaluation match of a pool problem as removal details, or None."""
        toks = tokens(question)
        grams = ngrams(toks, NGRAM) if len(toks) >= NGRAM else set()
        shared: Counter = Counter(i for g in grams for i in self.by_gram.get(g, ()))
        best = None
        for i, n in shared.items():
            item = self.items[i]
            ratio = n / max(1, min(len(grams), len(item.grams)))
            if n >= MIN_SHARED and ratio >= overlap and (best is None or ratio > best[0]):
                best = (ratio, i, "overlap")
        if best is None:
            shingles, nums = ngrams(toks, SHINGLE), numbers(toks)
            for i in self.lsh.query(signature):
                item = self.items[i]
                score = jaccard(shingles, item.shingles)
                if score >= similarity and item.numbers == nums and (best is None or score > best[0]):
                    best = (score, i, "similarity")
        if best is None:
            return None
        value, i, kind = best
        item = self.items[i]
        return {"benchmark": item.benchmark, "match": {"id": item.id, "text": item.text}, kind: round(value, 4)}


def remove_contaminated(pool: list[dict], eval_dir: Path, overlap: float = DEFAULT_OVERLAP,
                  similarity: float = DEFAULT_SIMILARITY) -> tuple[list[dict], list[dict], dict]:
    """(kept, removed, stats)."""
    for name, value in (("--ngram-overlap", overlap), ("--similarity", similarity)):
        if not 0 < value <= 1:
            raise UserError(f"{name} must be in (0, 1], got {value}")
    index = Index(load_suites(eval_dir))
    signatures = minhashes(ngrams(tokens(e["question"]), SHINGLE) for e in pool)
    kept, gone = [], []
    for e, signature in zip(pool, signatures):
        hit = index.match(e["question"], signature, overlap, similarity)
        if hit is None:
            kept.append(e)
        else:
            gone.append(mark_removed(e, "contaminated", **hit))
    by_benchmark = Counter(e["benchmark"] for e in gone)
    stats = {"records": len(pool), "eval_problems": len(index.items), "kept": len(kept), "removed": len(gone),
             "by_benchmark": dict(sorted(by_benchmark.items()))}
    return kept, gone, stats
