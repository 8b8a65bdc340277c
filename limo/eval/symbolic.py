"""Symbolic equality of two leaf expressions, through math-verify (sympy underneath).

Runs only inside the time-limited worker (limo/eval/timelimit.py): math-verify's own timeouts use
signal.alarm, which works only on the main thread of the main process, so they are switched off
here (parsing_timeout=None, timeout_seconds=None) and the worker's deadline bounds the time.
"""

from __future__ import annotations

import functools
import logging
import sys
from fractions import Fraction

from latex2sympy2_extended.math_normalization import NormalizationConfig
from math_verify import parse, verify
from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig
from sympy import Basic, Expr, Float, I, Rational, simplify
from sympy.core.relational import Equality, Relational

from limo.eval.normalize import REL_TOL
from limo.eval.relations import same_relation

# Parse the whole string as one expression: no \boxed search, no "first number in the text", and
# no unit stripping (limo/eval/normalize.py owns units: math-verify's list would turn `-3 m` into -3).
_NORMALIZATION = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="none",
                                     equations=False)
_CONFIG = [LatexExtractionConfig(try_extract_without_anchor=True, boxed_match_priority=-1, normalization_config=_NORMALIZATION),
           ExprExtractionConfig(try_extract_without_anchor=True)]

# math-verify warns on every call that its timeouts are off; that is deliberate here.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse(s: str) -> list:
    """math-verify's parse, memoised: a worker sees the same gold for every sample of a problem,
    and parsing (an ANTLR grammar) is half the cost of a symbolic comparison."""
    return list(_parse_cached(s))


@functools.lru_cache(maxsize=4096)
def _parse_cached(s: str) -> tuple:
    return tuple(parse(f"${s}$", extraction_config=_CONFIG, parsing_timeout=None))


def _real_value(expr: Basic) -> Fraction | None:
    """A closed-form real number as an exact-enough Fraction (30 digits), or None."""
    if not isinstance(expr, Basic) or expr.free_symbols:
        return None
    value = expr.evalf(30)
    if not value.is_real or not value.is_finite:
        return None
    return Fraction(str(value))


# Agreement to this many significant digits sends two huge or tiny values to the exact check;
# less agreement is a difference that 30-digit evaluation already proves.
_MAGNITUDE_DIGITS = 20


def _outside_floats(value: Basic) -> bool:
    """Nonzero and past a double's normal range: where math-verify's float checks (rounding, and
    `chop`, which calls anything below ~1e-15 relative zero) say 1/2004! == 1/2006! == 0."""
    magnitude = abs(value)
    return magnitude != 0 and not (sys.float_info.min <= magnitude <= sys.float_info.max)


def _exact(expr: Expr) -> Expr:
    """The exact value: factorials and powers evaluated (the worker's time limit and memory cap
    bound 10^{10^{10}}), decimals read as the rationals they spell."""
    expr = expr.xreplace({f: Rational(str(f)) for f in expr.atoms(Float)})
    return expr.doit()


def exact_number_equal(pred: Basic, gold: Basic) -> bool | None:
    """Two closed-form numbers of which either overflows or underflows a double, compared exactly;
    None when the float-based comparison is sound (both in range) or they are not plain numbers.

    A 30-digit evaluation (mpmath: no exponent limit) first settles values that differ in their
    leading digits, so 1/2004! vs 1/2006! or 10^{10^{10}} vs 5 cost nothing; values that agree
    that far are evaluated exactly, which for 1000! is fast and for 10^{10^{10}} + 1 runs into
    the time limit, i.e. counts as wrong rather than as a float coincidence."""
    if not (isinstance(pred, Expr) and isinstance(gold, Expr) and pred.is_number and gold.is_number):
        return None
    pv, gv = pred.evalf(30), gold.evalf(30)
    if not (pv.is_finite and gv.is_finite) or not (_outside_floats(pv) or _outside_floats(gv)):
        return None
    if abs(pv - gv) > Float(10) ** -_MAGNITUDE_DIGITS * max(abs(pv), abs(gv)):
        return False
    p, g = _exact(pred), _exact(gold)
    if p.is_Rational and g.is_Rational:
        return bool(p == g)
    return bool(simplify(p - g) == 0)


def _has_decimal(s: str) -> bool:
    return any(c == "." and (i + 1 < len(s) and s[i + 1].isdigit()) for i, c in enumerate(s))


def relation_equal(pred: str, gold: str) -> bool:
    """Two relations written out in full (`y = ...` kept), compared by limo/eval/relations.py."""
    try:
        p, g = _parse(pred), _parse(gold)
        return bool(p and g and isinstance(p[0], Relational) and isinstance(g[0], Relational) and same_relation(p[0], g[0]))
    except Exception:  # noqa: BLE001 - sympy raises many kinds on odd input: "not shown equal"
        return False


def _complex_equal(pred: Basic, gold: Basic) -> bool:
    """Complex arithmetic (`i(2-i)` and `1+2i`): when `i` is the only symbol of both, it is the
    imaginary unit, and the values must be equal."""
    if not (isinstance(pred, Expr) and isinstance(gold, Expr)):
        return False
    symbols = pred.free_symbols | gold.free_symbols
    if not symbols or any(str(s) != "i" for s in symbols):  # a parser's `i` may carry assumptions: matched by name
        return False
    unit = dict.fromkeys(symbols, I)
    return simplify(pred.subs(unit) - gold.subs(unit)) == 0


def symbolic_equal(pred: str, gold: str) -> bool:
    """math-verify's symbolic/numeric equality; and, when one side is a rounded decimal and the
    gold is not an integer, the values within a relative 1e-4."""
    try:
        p, g = _parse(pred), _parse(gold)
        if not p or not g:
            return False
        exact = exact_number_equal(p[0], g[0])
        if exact is not None:
            return exact
        if isinstance(p[0], Equality) or isinstance(g[0], Equality):
            return same_relation(p[0], g[0])  # never math-verify's: it accepts any rescaled equation
        if verify(g, p, timeout_seconds=None, strict=True):
            return True
        if isinstance(p[0], Relational) and isinstance(g[0], Relational):
            return same_relation(p[0], g[0])
        if _complex_equal(p[0], g[0]):
            return True
    except Exception:  # noqa: BLE001 - sympy raises many kinds on odd input: "not shown equal"
        return False
    if not (_has_decimal(pred) or _has_decimal(gold)):
        return False
    try:
        pv, gv = _real_value(p[0]), _real_value(g[0])
    except Exception:  # noqa: BLE001 - as above
        return False
    if pv is None or gv is None or (gv.denominator == 1 and not _has_decimal(gold)):
        return False
    return abs(pv - gv) <= REL_TOL * abs(gv)
