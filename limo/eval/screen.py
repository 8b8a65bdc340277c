r"""A float screen before sympy: two leaves of plain arithmetic whose values clearly differ.

Most answers that reach the symbolic comparison are wrong, and plainly so (`\sqrt{3}` for 2,
`4n^2` for `8n^2 + 4n + 1`); math-verify spends tens of milliseconds parsing and simplifying each
to say so. This module evaluates a small, unambiguous subset of LaTeX arithmetic with floats,
at a few fixed positive points for the variables, and calls two leaves different only when their
values are far apart at some point: further than every tolerance a later check applies (math-verify
rounds decimals to 6 places, our protocol allows a relative 1e-4). Anything outside the subset,
or not real is left to sympy (`None`), so a verdict never changes, it only comes sooner. A
leaf of numbers alone is evaluated exactly, in rationals, when it has no roots, pi or floors
(`2^{2022}`, `10^{20} + 1 - 10^{20}`); in floats, a difference within rounding of the largest
term summed is no evidence. `i` is the imaginary unit (complex values): two rational expressions
that differ at i = sqrt(-1) differ as expressions in a symbol `i` too, so the verdict is sympy's
whichever way it reads `i` (`1 + 264i` against `1 + 274i` took sympy 0.27 s). A run of letters
outside a command that holds a Greek, function or constant name (`mu`, `xi`, `pi`, `sin`) is
declined: sympy may read one symbol there, where the screen reads a product.

The subset: numbers, one-letter variables, subscripted or not (not e, j, E, I: constants to
sympy, or meant as ones; i only as above),
lowercase Greek variables, `\pi`, + and -, `\cdot`, `\times`, `*` and `/`, juxtaposition (which
binds tighter than `/`, as in latex2sympy: `1/2n` is `1/(2n)`), `\frac{}{}`, `\sqrt{}`,
`\sqrt[n]{}`, `^` with a braced, one-digit or one-letter exponent, floors and ceilings, and (),
[] or {} groups. No functions, no `!`, no relations, no number right after a factor (`2 3` is 5
to latex2sympy).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# Far enough apart that no later check can call them equal (see the module docstring).
REL_GAP = 1e-3
ABS_GAP = 1e-3
# Values for each variable: positive (no branch cuts), irrational-looking, different per point.
_POINTS = ((1.2347, 0.8123, 1.5791, 2.1318, 0.6637), (2.7183, 1.4142, 0.5772, 1.7321, 3.1416))
_LETTERS = "abcdfghklmnopqrstuvwxyzABCDFGHJKLMNOPQRSTUVWXYZ"
_GREEK = ("alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "phi",
          "varphi", "chi", "psi", "omega")
_TOKEN_RE = re.compile(r"\s*(\d+\.?\d*|\.\d+|\\(?:frac|sqrt|pi|cdot|times|[lr]floor|[lr]ceil|%s)(?![a-zA-Z])|[a-zA-Z]"
                       r"(?:_(?:\{\w+\}|\w))?|[-+*/^()\[\]{}])" % "|".join(_GREEK))
_CLOSERS = {"(": ")", "[": "]", "{": "}", "\\lfloor": "\\rfloor", "\\lceil": "\\rceil"}
_ENDS = ("+", "-", "*", "/", "\\cdot", "\\times", ")", "]", "}", "\\rfloor", "\\rceil", "^")
_MAX_EXPONENT = 4096.0
_TINY = 1e-250  # below this a float result may have lost a factor to underflow: not evidence
_MAX_EXACT_BITS = 1 << 16  # an exact power's size bound: 2^{2022} is evaluated, 10^{10^{10}} is not
# Two or more letters in a row outside a command are a product of one-letter variables here, as
# to sympy ("2RC", "AB"), unless they hold a name sympy may read as one symbol, function or
# constant ("mu", "xi", "pi", "sin", "oo"): a run holding one of those is declined.
_BARE_RUN_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_NAMES_IN_RUNS = re.compile("|".join(sorted((
    *_GREEK, "epsilon", "zeta", "eta", "iota", "kappa", "omicron", "pi", "upsilon",  # the Greek letters the subset leaves out
    "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "lg", "exp", "lim", "max", "min", "sup", "inf", "gcd", "lcm",
    "det", "arg", "deg", "mod", "dim", "ker", "re", "im", "sgn", "sqrt", "oo", "nan", "zoo",
), key=len, reverse=True)), re.IGNORECASE)  # fmt: skip
_CANCELLATION = 1e-12  # a difference below this fraction of the largest term summed may be rounding


class _Unsupported(Exception):
    """Outside the subset: sympy decides."""


def _tokens(text: str) -> list[str]:
    tokens, i = [], 0
    while i < len(text):
        m = _TOKEN_RE.match(text, i)
        if m is None:
            if text[i:].strip():
                raise _Unsupported(text[i:i + 10])
            break
        tokens.append(m.group(1).replace("{", "").replace("}", "") if "_" in m.group(1) else m.group(1))
        i = m.end()
    return tokens


def _checked(value: float, *factors: float) -> float:
    """A product or power that underflowed (nonzero factors, a result near 0) proves nothing.
    Exact rationals never underflow."""
    if isinstance(value, Fraction):
        return value
    if value == 0 and all(f != 0 for f in factors) or 0 < abs(value) < _TINY:
        raise _Unsupported("underflow")
    return value


class _Evaluator:
    """Recursive descent, loosest first: sum -> product (* and /) -> signed -> juxtaposition ->
    power -> atom; one value per call."""

    def __init__(self, tokens: list[str], values: dict[str, float | complex], exact: bool = False):
        self.tokens, self.i, self.values, self.exact = tokens, 0, values, exact
        self.largest_term = 0.0  # of every sum: what float cancellation can lose a fraction of

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, want: str | None = None) -> str:
        token = self.peek()
        if token is None or (want is not None and token != want):
            raise _Unsupported(f"expected {want!r}, got {token!r}")
        self.i += 1
        return token

    def sum(self) -> float:
        value = self.product()
        while self.peek() in ("+", "-"):
            op, right = self.take(), self.product()
            self.largest_term = max(self.largest_term, abs(value), abs(right))
            value = value + right if op == "+" else value - right
        return value

    def product(self) -> float:
        value = self.signed()
        while self.peek() in ("*", "/", "\\cdot", "\\times"):
            op, right = self.take(), self.signed()
            if op == "/":
                if right == 0:
                    raise _Unsupported("division by zero")
                value = _checked(value / right, value)
            else:
                value = _checked(value * right, value, right)
        return value

    def signed(self) -> float:
        if self.peek() == "-":
            self.take()
            return -self.signed()
        if self.peek() == "+":
            self.take()
            return self.signed()
        return self.juxtaposed()

    def juxtaposed(self) -> float:
        value = self.power()
        while (token := self.peek()) is not None and token not in _ENDS:
            if token[0].isdigit() or token[0] == ".":
                raise _Unsupported("a number after a factor")  # `2 3`, `x2`: the parser's choice
            right = self.power()  # 2x, 18\pi, 2\sqrt{3}
            value = _checked(value * right, value, right)
        return value

    def power(self) -> float:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        token = self.peek()
        if token == "{":
            exponent = self.group("{")
        elif token is not None and (token.isdigit() and len(token) == 1 or token in self.values):
            exponent = self.atom()
        else:
            raise _Unsupported("exponent")
        if isinstance(base, complex) or isinstance(exponent, complex):
            if isinstance(exponent, complex) or not float(exponent).is_integer() or abs(exponent) > 64:
                raise _Unsupported("complex power")  # only small integer powers of a complex base
            return base ** int(exponent)
        if abs(exponent) > _MAX_EXPONENT or (base < 0 and not float(exponent).is_integer()) or base == 0 >= exponent:
            raise _Unsupported("exponent range")
        if self.exact:
            if exponent.denominator != 1 or max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(exponent) > _MAX_EXACT_BITS:
                raise _Unsupported("exact power")
            return base ** int(exponent)
        return _checked(base ** exponent, base)

    def group(self, left: str) -> float:
        self.take(left)
        value = self.sum()
        self.take(_CLOSERS[left])
        return value

    def atom(self) -> float:
        token = self.peek()
        if token is None:
            raise _Unsupported("end")
        if token[0].isdigit() or token[0] == ".":
            self.take()
            return Fraction(token) if self.exact else float(token)
        if self.exact and token not in ("(", "[", "{", "\\frac"):
            raise _Unsupported(token)  # numbers and rational arithmetic only
        if token in self.values:
            self.take()
            if self.peek() == "(":
                raise _Unsupported("f(x)")  # a function applied, or a product: the parser's choice
            return self.values[token]
        if token == "\\pi":
            self.take()
            return math.pi
        if token in ("(", "[", "{"):
            return self.group(token)
        if token in ("\\lfloor", "\\lceil"):
            value = self.group(token)
            if isinstance(value, complex):
                raise _Unsupported("floor of a complex value")
            return float(math.floor(value) if token == "\\lfloor" else math.ceil(value))
        if token == "\\frac":
            self.take()
            num, den = self.group("{"), self.group("{")
            if den == 0:
                raise _Unsupported("zero denominator")
            return _checked(num / den, num)
        if token == "\\sqrt":
            self.take()
            index = 2.0
            if self.peek() == "[":
                index = self.group("[")
                if index not in (2.0, 3.0, 4.0, 5.0):
                    raise _Unsupported("root index")
            radicand = self.group("{")
            if isinstance(index, complex) or isinstance(radicand, complex) or radicand < 0:
                raise _Unsupported("negative radicand")
            return radicand ** (1.0 / index)
        raise _Unsupported(token)


def _value(tokens: list[str], values: dict[str, float | complex], exact: bool = False) -> tuple[float | complex | Fraction, float]:
    """(the value, the largest term any of its sums added: 0 for exact values, which lose nothing)."""
    evaluator = _Evaluator(tokens, values, exact)
    value = evaluator.sum()
    if evaluator.peek() is not None:
        raise _Unsupported(f"trailing {evaluator.peek()!r}")
    if exact:
        return value, 0.0
    if not math.isfinite(abs(value)) or (value != 0 and not 1e-250 < abs(value) < 1e250):
        raise _Unsupported("range")
    return value, evaluator.largest_term


def _far_apart(p_and_term, g_and_term) -> bool:
    """Further apart than any later check's tolerance (exact for rationals, whatever their size),
    and than what float cancellation can have lost: `10^{20} + 1 - 10^{20}` is 0 in floats."""
    (p, p_term), (g, g_term) = p_and_term, g_and_term
    if isinstance(p, Fraction):
        return abs(p - g) > max(Fraction(REL_GAP) * max(abs(p), abs(g)), Fraction(ABS_GAP))
    return abs(p - g) > max(REL_GAP * max(abs(p), abs(g)), ABS_GAP, _CANCELLATION * max(p_term, g_term))


def clearly_different(pred: str, gold: str) -> bool:
    """True when both normalised leaves are in the subset and their values are far apart at one of
    the fixed points; False means "not shown different here", never "equal"."""
    if "%" in pred or "%" in gold or any(_NAMES_IN_RUNS.search(run) for run in _BARE_RUN_RE.findall(f"{pred} {gold}")):
        return False
    try:
        p_tokens, g_tokens = _tokens(pred), _tokens(gold)
        names = sorted({t for t in p_tokens + g_tokens if t[0].isalpha() or t[1:] in _GREEK})
        if any(n[0].isalpha() and n[0] not in _LETTERS and n != "i" for n in names):
            return False
        if not names:
            try:  # numbers alone: exact rationals (no rounding, no range), floats where roots, pi or floors need them
                return _far_apart(_value(p_tokens, {}, exact=True), _value(g_tokens, {}, exact=True))
            except _Unsupported:
                return _far_apart(_value(p_tokens, {}), _value(g_tokens, {}))
        variables = [n for n in names if n != "i"]
        for point in _POINTS:
            values = {n: point[k % len(point)] * (1 + k // len(point)) for k, n in enumerate(variables)}
            if "i" in names:
                values["i"] = 1j
            if _far_apart(_value(p_tokens, values), _value(g_tokens, values)):
                return True
    except (_Unsupported, OverflowError, ZeroDivisionError, ValueError, RecursionError):
        return False
    return False
