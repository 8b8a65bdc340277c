"""Step 5, select: the top N by score, spread over problem families and sources.

Greedy, best score first (ties broken by uid, so the choice is deterministic): a record is taken
unless its family already has `per_cluster` records or its source already has its share. A family
is a looser cluster than dedup's: problems whose token-trigram sets have a Jaccard similarity of
at least `family_threshold` (0.5), linked transitively; the same question with other numbers or a
variant of a known problem falls in its original's family. A source is the record's own `source`
field, else its pool file; with more than one source, none takes more than `per_source` of the N
(default half). Records left over are removed as "not_selected". Without a score (the score step
not run), the pool order ranks them.
"""

from __future__ import annotations

import math
from collections import Counter

from limo.curate.records import mark_removed
from limo.curate.text import jaccard, lsh_index, minhashes, ngrams, tokens, union_find
from limo.tools.errors import UserError

DEFAULT_N = 817
DEFAULT_FAMILY_THRESHOLD = 0.5
SHINGLE = 3


def families(pool: list[dict], threshold: float) -> list[int]:
    """The family (smallest member's position) of each record."""
    shingles = [ngrams(tokens(e["question"]), SHINGLE) for e in pool]
    signatures = minhashes(shingles)
    lsh = lsh_index(signatures, threshold)
    links = [(i, j) for i, m in enumerate(signatures) for j in lsh.query(m) if j > i and jaccard(shingles[i], shingles[j]) >= threshold]
    return [int(c) for c in union_find(len(pool), links)]


def select_top(pool: list[dict], n: int = DEFAULT_N, per_cluster: int = 1, per_source: float = 0.5,
           family_threshold: float = DEFAULT_FAMILY_THRESHOLD) -> tuple[list[dict], list[dict], dict]:
    """(kept with `rank` and `family`, removed as not_selected, stats)."""
    if n < 1 or per_cluster < 1 or not 0 < per_source <= 1 or not 0 < family_threshold <= 1:
        raise UserError(f"--select >= 1, --per-cluster >= 1, --per-source in (0, 1] and --family-threshold in (0, 1] "
                         f"needed; got {n}, {per_cluster}, {per_source}, {family_threshold}")
    family = families(pool, family_threshold) if pool else []
    sources = {e["source"] for e in pool}
    source_cap = math.ceil(per_source * n) if len(sources) > 1 else n
    scored = all("score" in e for e in pool)
    order = sorted(range(len(pool)), key=lambda i: (-pool[i]["score"], pool[i]["uid"])) if scored else list(range(len(pool)))
    taken: list[int] = []
    per_family: Counter = Counter()
    per_src: Counter = Counter()
    for i in order:
        e = pool[i]
        if len(taken) < n and per_family[family[i]] < per_cluster and per_src[e["source"]] < source_cap:
            taken.append(i)
            per_family[family[i]] += 1
            per_src[e["source"]] += 1
    chosen = set(taken)
    kept = [{**pool[i], "rank": r, "family": pool[family[i]]["uid"]} for r, i in enumerate(taken, 1)]
    gone = [mark_removed({**e, "family": pool[family[i]]["uid"]}, "not_selected") for i, e in enumerate(pool) if i not in chosen]
    stats = {"records": len(pool), "kept": len(kept), "not_selected": len(gone), "families": len(set(family)),
             "ranked_by": "score" if scored else "pool order", "source_cap": source_cap,
             "by_source": dict(sorted(Counter(pool[i]["source"] for i in taken).items()))}
    return kept, gone, stats
