r"""Answers that are relations, not values: an equation or an inequality against another.

Runs only inside the time-limited worker (sympy underneath), like limo/eval/symbolic.py. A relation
is reduced to `d ~ 0` with `d = lhs - rhs` and `~` one of `=`, `<`, `<=` (`a > b` is `b - a < 0`).
Two relations are the same when their kinds match and `d1 = c * d2` for a rational constant c:

- inequalities: any c > 0 (`2x < 2` is `x < 1`; `-x > -1` is `x - 1 < 0`);
- equations: c = +-1 always (sides swapped, or every term negated: `34x+45y-20z+100=0` and
  `-34x-45y+20z-100=0`); any other c only when the two are not both written with integer
  coefficients. The scale of an integer form can be the answer itself: "the plane in the form
  Ax + By + Cz + D = 0 with gcd(|A|,|B|,|C|,|D|) = 1" makes `20x - 28y + 44z + 16 = 0` wrong for
  `5x - 7y + 11z + 4 = 0` (an adjudicated MATH output, tests/adjudicated.json). A form with a
  fractional coefficient, such as a line solved for y (`y = -\frac{1}{2}x + \frac{3}{4}`), has no
  scale to get wrong, so it matches every rescaling (`2x + 4y - 3 = 0`).

A relation without a variable, a chain (`a < x < b`, handled as an interval by limo/eval/equivalence.py)
and `\neq` are not compared here.
"""

from __future__ import annotations

from sympy import Basic, Expr, Poly, simplify
from sympy.core.relational import Equality, GreaterThan, LessThan, StrictGreaterThan, StrictLessThan
from sympy.polys.polyerrors import PolynomialError

# relation type -> (kind, whether d is lhs - rhs (else rhs - lhs))
_KINDS = {Equality: ("=", True), StrictLessThan: ("<", True), LessThan: ("<=", True),
          StrictGreaterThan: ("<", False), GreaterThan: ("<=", False)}


def _reduced(relation: Basic) -> tuple[str, Expr] | None:
    """(kind, d) with the relation read as `d kind 0`; None for anything else."""
    kind = _KINDS.get(type(relation))
    if kind is None:
        return None
    d = relation.lhs - relation.rhs if kind[1] else relation.rhs - relation.lhs
    return (kind[0], d) if isinstance(d, Expr) and d.free_symbols else None


def _integer_form(d: Expr) -> bool:
    """Written with integer coefficients only (a polynomial's), or not a polynomial at all: either
    way a form whose scale means something, so only +-1 rescales it."""
    try:
        poly = Poly(d, *sorted(d.free_symbols, key=str))
    except PolynomialError:
        return True
    return all(c.is_Integer for c in poly.coeffs())


def same_relation(pred: Basic, gold: Basic) -> bool:
    """The same equation or inequality up to rearrangement and the rescaling allowed above."""
    a, b = _reduced(pred), _reduced(gold)
    if a is None or b is None or a[0] != b[0]:
        return False
    kind, d1 = a
    d2 = b[1]
    if simplify(d1 - d2) == 0:
        return True
    c = simplify(d1 / d2)
    if not (c.is_Rational and c != 0):
        return False
    if kind != "=":
        return bool(c > 0)
    return abs(c) == 1 or not (_integer_form(d1) and _integer_form(d2))
