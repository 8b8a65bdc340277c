r"""Grading: the model's answer out of its text, its verdict against the gold, and pass@k.

LIMO's protocol: the last `\boxed{}` in the output is the answer; it is right when it equals the
gold as a string, as a number (exact for integers, relative 1e-4 for rounded values) or
symbolically. Cheap checks run here; the structural and symbolic comparison runs in a worker
process under a time limit (limo/eval/timelimit.py), so a pathological answer costs at most the
limit and returns False, from any thread.
"""

from __future__ import annotations

import logging
import re
import threading
from math import expm1, fsum, log1p
from typing import Iterator, Sequence

from limo.eval.equivalence import equivalent, quick_verdict
from limo.eval.normalize import key, left_side, normalize
from limo.eval.timelimit import TimeLimitExceeded, WorkerCrashed, WorkerPool

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BARE_BOX_RE = re.compile(r"\s+([^\s$]+)")
_BRACE_RE = re.compile(r"(?<!\\)[{}]")
# What may stand between two boxes that list one answer's items: commas, "and", spacing, a short
# \text{} ("\text{ for part (a) and }"). Formula delimiters only with a comma or "and" among them
# (`\(\boxed{1}\) and \(\boxed{-2}\)`): `$$\boxed{20}$$ \boxed{143}` is a try and then the answer.
_LIST_GLUE_RE = re.compile(r"(?:\s|[,;]|\\[,;:! ]|\\q?quad(?![a-zA-Z])|\b(?:and|or)\b|\\text\s*\{[^{}$\d]{0,40}\}|\$|\\[()\[\]])*")
_DELIMITER_RE = re.compile(r"\$|\\[()\[\]]")
_JOINER_RE = re.compile(r",|\band\b")


def listed_with(text: str, end: int, start: int) -> bool:
    """Does text[end:start], between two answers, only list them (see _LIST_GLUE_RE)?"""
    if not _LIST_GLUE_RE.fullmatch(text, end, start):
        return False
    glue = text[end:start]
    return not _DELIMITER_RE.search(glue) or bool(_JOINER_RE.search(glue))
_CHOICE_RE = re.compile(r"^\(?([A-J])\)?(?:$|[.:)\s])")
# A gold that is an option: the letter alone, or the letter then its content ("C. x = 42", "(B) 3").
_GOLD_LETTER_RE = re.compile(r"\(?([A-J])\)?(?:[.:)]\s+\S.*)?")
_PRODUCT_RE = re.compile(r"\s*(?:[*^+/=_-]|\\(?:cdot|times|div|frac)(?![a-zA-Z]))")
# Option letters standing alone, and the words that join them in a hedge ("A or B", "(A), (C)").
_LETTER_TOKEN_RE = re.compile(r"(?<![A-Za-z\\])\(?([A-J])\)?(?![A-Za-z])")
_HEDGE_GLUE_RE = re.compile(r"(?:\b(?:or|and|both)\b|[\s,;/&.]|\\[,;!]|~)+", re.IGNORECASE)
# Longer extracted answers are compared as exact strings only: no real answer is this long, and
# normalising pathological nestings (`\text{\text{...}}` x 10^4) would cost seconds outside the time limit.
MAX_ANSWER_CHARS = 1000

_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def _closing_brace(text: str, start: int, limit: int) -> int | None:
    r"""The index of the `}` closing the `{` at `start` (escaped `\{`, `\}` skipped), or None when it
    is still open at `limit`. Only the box's own content is read, not the whole output."""
    depth = 0
    for m in _BRACE_RE.finditer(text, start, limit):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return m.start()
    return None


def _boxes_from_last(text: str) -> Iterator[tuple[int, int, str]]:
    r"""The complete boxes of `text` from the last backwards, as (start, end, content), lazily: a
    caller that needs only the last one reads only that one. Each box's braces are matched;
    `\boxed 5` without braces counts; an empty box is skipped; a box inside the one found after it
    is that one's content."""
    # A `{` still open at `open_at` never closes, and neither does any box that contains it: each
    # earlier box is read only up to there, so a run of unclosed boxes costs linear time.
    open_at, after = len(text), None
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _closing_brace(text, j, open_at)
            if end is None:
                open_at = j
                continue
            content, stop = text[j + 1:end].strip(), end + 1
        else:
            bare = _BARE_BOX_RE.match(text, m.end())
            content, stop = (bare.group(1).rstrip(".,;:"), bare.end()) if bare else ("", m.end())
        if content and not (after is not None and stop > after):
            after = m.start()
            yield m.start(), stop, content


def extract_answer(text: str) -> str | None:
    r"""The answer of a model's output: the content of its last complete `\boxed{...}` (braces
    matched; `\fbox` too; `\boxed 5` without braces), with the boxes listed right before it in the
    same formula (`\boxed{1}, \boxed{2}`; `\boxed{(2,2)} \quad \text{and} \quad \boxed{(6,2)}`)
    joined as one list. None when the text has none. An unclosed `\boxed{` (an output cut at the
    length limit) and an empty box are not answers."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects the model's output text (str), got {type(text).__name__}")
    listed: list[str] = []
    start = 0
    for box_start, end, content in _boxes_from_last(text):
        if listed and not listed_with(text, end, start):
            break
        listed.append(content)
        start = box_start
    return ", ".join(reversed(listed)) if listed else None


def choice_letter(text: str) -> str | None:
    """The option letter an answer names ("C", "(C)", "C. 5", "\\text{C}"), or None; None also for
    a hedge that names several options and nothing else ("A or B", "(A) and (C)", "A, B")."""
    norm = normalize(text)
    m = _CHOICE_RE.match(norm)
    if m is None or _PRODUCT_RE.match(norm, m.end(1)):  # `E * 2`, `C \cdot x`: a letter in a product is no option
        return None
    letters = {t.group(1) for t in _LETTER_TOKEN_RE.finditer(norm)}
    if len(letters) > 1 and not _HEDGE_GLUE_RE.sub("", _LETTER_TOKEN_RE.sub("", norm)):
        return None
    return m.group(1)


def _gold_text(gold: str | int | float) -> str:
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise TypeError(f"gold answer must be str, int or float, got {type(gold).__name__}: {gold!r}")
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))
    return str(gold)


def _worker_pool() -> WorkerPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool(preload=("limo.eval.symbolic",))
        return _pool


def is_equivalent(pred: str | None, gold: str | int | float, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Is the extracted answer `pred` the gold answer? False for None, for an empty answer, and
    for a comparison that does not finish within `timeout_s` or exhausts its worker's memory cap
    (safe from any thread). A worker that cannot start, or a bug in the comparison, raises."""
    gold = _gold_text(gold)
    if pred is not None and len(pred) > MAX_ANSWER_CHARS:
        return pred.strip() == gold.strip()
    if pred is None or not normalize(pred) or not normalize(gold):
        return False
    gold_letter = _GOLD_LETTER_RE.fullmatch(normalize(gold))
    if gold_letter and key(pred) != key(gold):  # a multiple-choice gold ("C", or "C. x = 42"): the option letters decide
        return choice_letter(pred) == gold_letter.group(1)
    named = left_side(pred), left_side(gold)
    if None not in named and named[0] != named[1]:  # `y = 5` is not `x = 5`, nor `\cos(x) = a` `\sin(x) = a`
        return False
    verdict = quick_verdict(pred, gold)
    if verdict is not None:
        return verdict
    try:
        return bool(_worker_pool().call(equivalent, (pred, gold), timeout_s))
    except TimeLimitExceeded:
        log.info("equivalence check timed out after %g s: pred=%.80r gold=%.80r", timeout_s, pred, gold)
        return False
    except WorkerCrashed as e:
        log.warning("equivalence check crashed its worker (%s): pred=%.80r gold=%.80r", e, pred, gold)
        return False


def grade(output: str, golds: Sequence[str | int | float], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[str | None, bool]:
    """The answer extracted from a model's whole output, and whether it matches any of the golds
    (e.g. a letter and its option). Every path that judges an output comes here: the evaluation,
    the agreement with the Qwen2.5-Math harness, curation. A grader failure is logged and counts as
    wrong (eval.run --regrade revisits it): it must not lose the batch it is in."""
    pred = extract_answer(output)
    try:
        return pred, any(is_equivalent(pred, gold, timeout_s=timeout_s) for gold in golds)
    except Exception:  # noqa: BLE001  (logged with its traceback)
        log.exception("grading failed (answer %.80r, golds %.80r); counted as wrong", pred, list(golds))
        return pred, False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right: 1 - C(n-c, k) / C(n, k). The ratio is
    prod_{i=n-c+1..n} (1 - k/i), summed in log space (log1p) and subtracted from 1 with expm1, so
    neither huge binomials nor the cancellation in 1 - (a number near 1) cost precision."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return -expm1(fsum(log1p(-k / i) for i in range(n - c + 1, n + 1)))
