r"""Are two answers the same mathematical object? Structure first, then numbers, then symbols.

An answer is read into a small tree: a leaf expression, an ordered group with its brackets
(tuple or interval: `(1,2]`), an unordered collection (a solution list `1, 2`, a set `\{1,2\}`,
`1 \pm \sqrt 5`, a union of intervals) or a matrix. Two trees match when their shapes match and
their leaves do; leaves are compared as exact numbers where both are plain literals, else, unless
a float screen already shows them apart (limo/eval/screen.py), symbolically through math-verify (sympy
underneath). Two answers that are each one equation or inequality are also compared as relations
(limo/eval/relations.py), which the trees cannot see.

This module can be slow or hang on hostile input (sympy will happily try to expand
10^{10^{10}}), so it is only ever run inside a worker process with a time limit:
limo/eval/grading.py calls `equivalent` through limo/eval/timelimit.py. Nothing here uses signals.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from fractions import Fraction

from limo.eval.normalize import REL_TOL, Number, key, normalize, parse_number
from limo.eval.screen import clearly_different

_OPEN, _CLOSE = "([{", ")]}"
_MATRIX_RE = re.compile(r"^\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.DOTALL)
_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z ]*[A-Za-z]")
_TRANSCENDENTAL_RE = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|sinh|cosh|tanh|log|ln|lg|exp)(?![a-zA-Z])")
_VAR = r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?"  # x, a_1, \theta, f(x): what the relation bounds
_OP = r"(<|>|\\leq|\\geq)"
_BOUND = r"([^<>=]+?|-?\\infty)"
_ONE_SIDED_RE = re.compile(rf"\s*({_VAR})\s*{_OP}\s*{_BOUND}\s*")
_ONE_SIDED_REVERSED_RE = re.compile(rf"\s*{_BOUND}\s*{_OP}\s*({_VAR})\s*")
_TWO_SIDED_RE = re.compile(rf"\s*{_BOUND}\s*{_OP}\s*({_VAR})\s*{_OP}\s*{_BOUND}\s*")
_LESS = ("<", "\\leq")
_FLIP = {"<": ">", ">": "<", "\\leq": "\\geq", "\\geq": "\\leq"}
_RELATION_OP_RE = re.compile(r"\\leq|\\geq|\\neq|<|>|=")
_LHS_NAME_RE = re.compile(r"\s*((?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-zA-Z, ]*\))?)\s*=(?!=)")
_PRIME_RE = re.compile(r"(?:(?<![A-Za-z])[A-Za-z]|\))'|\\prime(?![a-zA-Z])")  # E', f'(x), (x)': not "Paul's"
_OR_RE = re.compile(r"\s+(?:or|and)\s+|(?<=[)\]])\s*(?:or|and)\s*(?=[(\[])|\\(?:text\{ ?or ?\}|lor|vee)")  # `(11,7)or(7,11)` too


@dataclass(frozen=True)
class Tree:
    """kind: "leaf" | "ordered" | "unordered" | "union" | "matrix"; `left`/`right` hold the
    brackets of an ordered group and `\\{`, `\\}` for a set written as one."""

    kind: str
    text: str = ""
    items: tuple = ()
    left: str = ""
    right: str = ""


def split_top(s: str, sep: str) -> list[str]:
    r"""Split at `sep` where no bracket is open; `\{`, `\}`, `\left(` count as brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i) and not (sep[-1].isalpha() and s[i + len(sep):i + len(sep) + 1].isalpha()):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _closer_of_first(s: str) -> int:
    """Index of the bracket that closes s[0] (either kind: intervals mix `(` and `]`), or -1."""
    depth = 0
    for i, c in enumerate(s):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                return i
    return -1


def _expand_pm(s: str) -> list[str]:
    r"""`a \pm b` -> [`a + b`, `a - (b)`], `\pm b` -> [`b`, `-(b)`] (one top-level \pm)."""
    parts = split_top(s, "\\pm")
    if len(parts) != 2 or not parts[1]:
        return [s]
    head, tail = parts
    return [f"{head} + {tail}", f"{head} - ({tail})"] if head else [tail, f"-({tail})"]


def relation_to_interval(s: str) -> str | None:
    r"""`x < 3` -> `(-\infty, 3)`, `-1 \leq t < 2` -> `[-1, 2)`: a solution set written as a
    relation on one variable, as the interval it describes; None for anything else."""
    if m := _TWO_SIDED_RE.fullmatch(s):
        low, op1, _, op2, high = m.groups()
        if (op1 in _LESS) != (op2 in _LESS):
            return None
        if op1 not in _LESS:  # b > x > a
            low, high, op1, op2 = high, low, _FLIP[op2], _FLIP[op1]
        return f"{'(' if op1 == '<' else '['}{low}, {high}{')' if op2 == '<' else ']'}"
    if m := _ONE_SIDED_RE.fullmatch(s):
        _, op, bound = m.groups()
    elif m := _ONE_SIDED_REVERSED_RE.fullmatch(s):
        bound, op, _ = m.groups()
        op = _FLIP[op]
    else:
        return None
    return {"<": f"(-\\infty, {bound})", "\\leq": f"(-\\infty, {bound}]",
            ">": f"({bound}, \\infty)", "\\geq": f"[{bound}, \\infty)"}[op]


def parse_tree(text: str) -> Tree:
    """Read an answer's structure (see the module docstring)."""
    s = normalize(text)
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)
    if s[:1] in "([" and s[-1:] in ")]" and _MATRIX_RE.match(s[1:-1].strip()):
        s = s[1:-1].strip()  # `\left[\begin{array}{cc}...\end{array}\right]`: the brackets are the matrix's own
    if m := _MATRIX_RE.match(s):
        rows = [r for r in split_top(m.group(2), "\\\\") if r]
        return Tree("matrix", s, tuple(tuple(parse_tree(c) for c in split_top(r, "&")) for r in rows))
    if parse_number(s) is not None:
        return Tree("leaf", s)
    parts = split_top(s, "\\cup")
    if len(parts) > 1:
        return Tree("union", s, tuple(parse_tree(p) for p in parts))
    parts = [p for chunk in split_top(_OR_RE.sub(",", s), ",") for p in _expand_pm(chunk) if p]
    if len(parts) > 1:
        return Tree("unordered", s, tuple(parse_tree(p) for p in parts))
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        return Tree("unordered", s, tuple(parse_tree(p) for p in split_top(inner, ",") if p), "\\{", "\\}")
    interval = relation_to_interval(s)
    if interval is not None:
        return parse_tree(interval)
    if s[:1] in "([" and s[-1:] in ")]" and _closer_of_first(s) == len(s) - 1:
        parts = split_top(s[1:-1], ",")
        if len(parts) > 1:
            return Tree("ordered", s, tuple(parse_tree(p) for p in parts), s[0], s[-1])
    return Tree("leaf", s)


def _in_float_range(x: Fraction) -> bool:
    """Zero, or a double's normal range: where a relative tolerance is what the protocol means."""
    return x == 0 or sys.float_info.min <= abs(x) <= sys.float_info.max


def numbers_match(pred: Number, gold: Number) -> bool:
    """Exact for integer golds (102019 is not 102018); relative 1e-4 otherwise, but only between
    values a double holds: 10^{-400} and 10^{-401} (or 10^{500} and 10^{500} + 1) are compared
    exactly. A side written with a % sign may also stand for its value / 100 (50% and 0.5);
    without one, no rescaling (1 is not 100, whatever the Qwen2.5-Math harness says)."""
    preds = [pred.value] + ([pred.value / 100] if pred.percent else [])
    golds = [gold.value] + ([gold.value / 100] if gold.percent else [])
    for p in preds:
        for g in golds:
            if p == g:
                return True
            if (g.denominator == 1 and not gold.decimal) or not (_in_float_range(p) and _in_float_range(g)):
                continue
            if abs(p - g) <= REL_TOL * abs(g):
                return True
    return False


def _is_words(s: str) -> bool:
    """Plain words ("Evelyn", "even"): compared as text only, never as products of symbols."""
    return _WORDS_RE.fullmatch(s) is not None and len(s) >= 2


def quick_verdict(pred: str, gold: str) -> bool | None:
    """The cheap checks, linear-time string work safe in any process: the same string (key), or
    two plain numeric literals (exactly, or within REL_TOL when rounded). None: not settled here."""
    if key(pred) == key(gold):
        return True
    if bool(_PRIME_RE.search(key(pred))) != bool(_PRIME_RE.search(key(gold))):
        return False  # `E'` is not `E`, nor `f'(x)` `f(x)`: sympy drops the prime
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        return numbers_match(p, g)
    return None


def leaf_equal(pred: str, gold: str) -> bool:
    """Two leaf expressions: the quick checks, then symbolic equality."""
    verdict = quick_verdict(pred, gold)
    if verdict is not None:
        return verdict
    g = parse_number(gold)
    if _is_words(normalize(pred)) or _is_words(normalize(gold)):
        return False
    if g is not None and _TRANSCENDENTAL_RE.search(pred):
        return False  # a number was asked for; an unevaluated cos(2pi/5)... is not an answer yet
    if clearly_different(normalize(pred), normalize(gold)):
        return False  # settled by floats in microseconds; sympy would take tens of milliseconds to agree
    from limo.eval.symbolic import symbolic_equal  # here, not at the top: the grading process never loads sympy

    return symbolic_equal(normalize(pred), normalize(gold))


def _all_intervals(*trees: Tree) -> bool:
    """A union of intervals and a list of the same intervals ("x < 1 or x > 2") are one set."""
    return all(item.kind == "ordered" and len(item.items) == 2 for t in trees for item in t.items)


def _match_unordered(preds: tuple, golds: tuple) -> bool:
    """Multiset equality under `trees_equal`: every gold matched by a distinct prediction. A list
    of tuples is a set of solutions: a tuple written twice counts once (not a list of numbers,
    where `2, 2, 3` may be roots with their multiplicity)."""
    if all(t.kind == "ordered" for t in (*preds, *golds)):
        preds, golds = _distinct(preds), _distinct(golds)
    if len(preds) != len(golds):
        return False
    unused = list(preds)
    for g in golds:
        hit = next((i for i, p in enumerate(unused) if trees_equal(p, g)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _distinct(items: tuple) -> tuple:
    seen: dict[str, Tree] = {}
    for item in items:
        seen.setdefault(key(item.text), item)
    return tuple(seen.values())


def trees_equal(pred: Tree, gold: Tree) -> bool:
    """Shape by shape: brackets must match for ordered groups ([2, oo) is not (2, oo))."""
    if pred.kind == "leaf" and gold.kind == "leaf":
        return leaf_equal(pred.text, gold.text)
    if pred.kind == "ordered" and gold.kind == "ordered":
        return (pred.left, pred.right) == (gold.left, gold.right) and len(pred.items) == len(gold.items) and all(
            trees_equal(p, g) for p, g in zip(pred.items, gold.items))
    if pred.kind == "matrix" and gold.kind == "matrix":
        return len(pred.items) == len(gold.items) and all(
            len(pr) == len(gr) and all(trees_equal(p, g) for p, g in zip(pr, gr))
            for pr, gr in zip(pred.items, gold.items))
    if {pred.kind, gold.kind} <= {"union", "unordered"} and (pred.kind == gold.kind or _all_intervals(pred, gold)):
        return _match_unordered(pred.items, gold.items)
    # A gold written as a bare list answers "find a, b and c" in order (OlympiadBench writes its
    # tuples that way): a parenthesised tuple in the same order matches it.
    if gold.kind == "unordered" and not gold.left and pred.kind == "ordered" and pred.left + pred.right == "()":
        return len(pred.items) == len(gold.items) and all(trees_equal(p, g) for p, g in zip(pred.items, gold.items))
    # A one-element solution list or set against a bare answer: {5} and 5.
    if pred.kind == "unordered" and len(pred.items) == 1:
        return trees_equal(pred.items[0], gold)
    if gold.kind == "unordered" and len(gold.items) == 1:
        return trees_equal(pred, gold.items[0])
    return False


def _one_relation(s: str) -> bool:
    ops = _RELATION_OP_RE.findall(s)
    return len(ops) == 1 and ops[0] != "\\neq" and len(split_top(s, ",")) == 1


def relations_equal(pred: str, gold: str) -> bool:
    """Two answers that are each one equation or inequality, compared as relations (limo/eval/relations.py:
    rearranged, negated, rescaled). The trees cannot see it: `y =` was dropped as a label from
    `y = -\\frac{1}{2}x + \\frac{3}{4}`, and `x < 1` became an interval that `-x > -1` is not."""
    p, g = normalize(pred, keep_lhs=True), normalize(gold, keep_lhs=True)
    if not (_one_relation(p) and _one_relation(g)):
        return False
    lhs_p, lhs_g = _LHS_NAME_RE.match(p), _LHS_NAME_RE.match(g)
    if lhs_p and lhs_g and lhs_p.group(1) == lhs_g.group(1) and lhs_p.group(1) not in p[lhs_p.end():] + g[lhs_g.end():]:
        return False  # `f(x) = ...` both: the trees compared the right-hand sides, and no rescaling keeps f(x) alone
    from limo.eval.symbolic import relation_equal  # sympy stays out of the grading process, as in leaf_equal

    return relation_equal(p, g)


def equivalent(pred: str, gold: str) -> bool:
    """The full comparison; run it under a time limit (eval.grading.is_equivalent does)."""
    try:
        return trees_equal(parse_tree(pred), parse_tree(gold)) or relations_equal(pred, gold)
    except RecursionError:  # nesting deeper than the interpreter's stack: not a sensible answer
        return False
