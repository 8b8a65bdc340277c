"""Step 1, dedup: one record per cluster of exact or near-duplicate problems.

Problems are compared on their canonical text (limo/curate/text.py). Exact duplicates share a
canonical string; near duplicates are pairs whose token-trigram sets have a Jaccard similarity of
at least `threshold`, found through MinHash LSH and then verified exactly (an LSH candidate alone
merges nothing). Links are closed transitively into clusters.

The rule: each cluster keeps its first record in pool order (the files in the order given, each
in file order), so a pool listed best source first keeps the best copy. The others are removed
as "duplicate", with `duplicate_of` naming the record kept. The kept record's `cluster` is the
uid it is known by, for the report.
"""

from __future__ import annotations

from limo.curate.records import mark_removed
from limo.curate.text import canonical, jaccard, lsh_index, minhashes, ngrams, tokens, union_find
from limo.tools.errors import UserError

SHINGLE = 3
DEFAULT_THRESHOLD = 0.8


def remove_duplicates(pool: list[dict], threshold: float = DEFAULT_THRESHOLD) -> tuple[list[dict], list[dict], dict]:
    """(kept, removed, stats) for envelopes in pool order."""
    if not 0 < threshold <= 1:
        raise UserError(f"--dup-threshold must be in (0, 1], got {threshold}")
    exact: dict[str, int] = {}
    links: list[tuple[int, int]] = []
    texts = [canonical(e["question"]) for e in pool]
    for i, text in enumerate(texts):
        first = exact.setdefault(text, i)
        if first != i:
            links.append((first, i))
    unique = sorted(exact.values())
    shingles = {i: ngrams(tokens(pool[i]["question"]), SHINGLE) for i in unique}
    signatures = minhashes(shingles[i] for i in unique)
    lsh = lsh_index(signatures, threshold)
    near = 0
    for k, i in enumerate(unique):
        for other in lsh.query(signatures[k]):
            j = unique[other]
            if j > i and jaccard(shingles[i], shingles[j]) >= threshold:
                links.append((i, j))
                near += 1
    cluster = union_find(len(pool), links)
    kept, gone = [], []
    for i, e in enumerate(pool):
        head = pool[cluster[i]]["uid"]
        if cluster[i] == i:
            kept.append({**e, "cluster": head})
        else:
            gone.append(mark_removed(e, "duplicate", duplicate_of=head))
    stats = {"records": len(pool), "exact_duplicates": len(pool) - len(unique), "near_duplicate_links": near,
             "kept": len(kept), "removed": len(gone)}
    return kept, gone, stats
