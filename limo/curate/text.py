r"""Problem text -> a canonical form, its tokens, shingles and MinHash signatures.

Dedup and decontamination compare problems after the same normalisation, so that a copy with new
whitespace, `\(...\)` for `$...$`, `\dfrac` for `\frac`, `1,000` for `1000`, `2.50` for `2.5` or
a "Problem 7." label in front reads as the original, and the opening verb ("Find", "Compute",
"Determine", "What is" ...) is one word, "ask". Tokens are words, numbers, LaTeX commands and
single symbols: `Find $x^2$` -> ['find', 'x', '^', '2'].
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

NUM_PERM = 64  # MinHash permutations: ~0.06 standard error on a Jaccard estimate, verified exactly after
_SEED = 1

# "Problem 7.", "Question 3:", "Exercise 2.1)", "7.", "(12)", "Q4." at the start: a label, not the problem.
_LABEL_RE = re.compile(r"^\s*(?:(?:problem|question|exercise|example|q)\s*#?\s*\d+(?:\.\d+)*\s*[.:)]?|\(?\d{1,3}\)|\d{1,3}\.(?!\d))\s*",
                       re.IGNORECASE)
_DELIMITER_RE = re.compile(r"\$\$|\$|\\\(|\\\)|\\\[|\\\]")
_SPACING_RE = re.compile(r"\\(?:[,;:!> ]|quad|qquad|left|right|displaystyle|textstyle|big|Big|bigg|Bigg)(?![a-zA-Z])|~")
_FRAC_RE = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_THOUSANDS_RE = re.compile(r"(?<![\d.])(\d{1,3})((?:(?:,|\{,\})\d{3})+)(?![\d])")
_TRAILING_ZEROS_RE = re.compile(r"(\d+\.\d*?)0+(?!\d)")
_TOKEN_RE = re.compile(r"\\[a-zA-Z]+|[^\W\d_]+|\d+(?:\.\d+)?|[^\s\w]")
# The opening request, whichever verb it uses: "Find", "Compute", "What is" ... all read as "ask".
_ASK_RE = re.compile(r"^(?:what is|what ' s|find|compute|calculate|determine|evaluate|solve|simplify|give|state|express"
                     r"|work out|figure out|obtain|derive|show|prove|identify|estimate|write)\b")


def canonical(text: str) -> str:
    """The normalised problem text (see the module docstring): lowercase tokens, one space apart."""
    s = unicodedata.normalize("NFKC", text)
    s = _LABEL_RE.sub("", s, count=1)
    s = _DELIMITER_RE.sub(" ", s)
    s = _SPACING_RE.sub(" ", s)
    s = _FRAC_RE.sub(r"\\frac", s)
    s = _THOUSANDS_RE.sub(lambda m: m.group(1) + re.sub(r"\D", "", m.group(2)), s)
    s = _TRAILING_ZEROS_RE.sub(lambda m: m.group(1).rstrip("."), s)
    return _ASK_RE.sub("ask", " ".join(_TOKEN_RE.findall(s.lower())), count=1)


def tokens(text: str) -> list[str]:
    """Tokens of the canonical text."""
    return canonical(text).split()


def ngrams(toks: Sequence[str], n: int) -> set[str]:
    """The token n-grams as strings; a text shorter than n is one n-gram of all its tokens."""
    if len(toks) < n:
        return {" ".join(toks)} if toks else set()
    return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def numbers(toks: Sequence[str]) -> tuple[str, ...]:
    """The numbers a problem states, sorted: two problems that differ in them are two problems."""
    return tuple(sorted(t for t in toks if t[0].isdigit()))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def minhashes(shingle_sets: Iterable[set[str]]) -> list:
    """datasketch MinHash signatures (NUM_PERM permutations, fixed seed) of many shingle sets."""
    from datasketch import MinHash

    out = []
    for shingles in shingle_sets:
        m = MinHash(num_perm=NUM_PERM, seed=_SEED)
        if shingles:
            m.update_batch([s.encode("utf-8") for s in shingles])
        out.append(m)
    return out


def lsh_index(signatures: Sequence, threshold: float):
    """A MinHashLSH over `signatures`, keyed by position."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    with lsh.insertion_session() as session:
        for i, m in enumerate(signatures):
            session.insert(i, m, check_duplication=False)
    return lsh


def union_find(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """The cluster of each of n items under the given links: the smallest member's index."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)])
