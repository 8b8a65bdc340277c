r"""A float screen before sympy: two leaves of plain arithmetic whose values clearly differ.

Most answers that reach the symbolic comparison are wrong, and plainly so (`\sqrt{3}` for 2,
`4n^2` for `8n^2 + 4n + 1`); math-verify spends tens of milliseconds parsing and simplifying each
to say so. This module evaluates a small, unambiguous subset of LaTeX arithmetic with floats,
at a few fixed positive points for the variables, and calls two leaves different only when their
values are far apart at some point: further than every tolerance a later check applies (math-verify
rounds decimals to 6 places, our protocol allows a relative 1e-4). Anything outside the subset,
past a double's range or not real is left to sympy (`None`), so a verdict never changes, it only
comes sooner.

The subset: numbers, one-letter variables, subscripted or not (not e, i, j, E, I: constants to
sympy, or meant as ones),
lowercase Greek variables, `\pi`, + and -, `\cdot`, `\times`, `*` and `/`, juxtaposition (which
binds tighter than `/`, as in latex2sympy: `1/2n` is `1/(2n)`), `\frac{}{}`, `\sqrt{}`,
`\sqrt[n]{}`, `^` with a braced, one-digit or one-letter exponent, floors and ceilings, and (),
[] or {} groups. No functions, no `!`, no relations, no number right after a factor (`2 3` is 5
to latex2sympy).
"""

from __future__ import annotations

import math
import re

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
    """A product or power that underflowed (nonzero factors, a result near 0) proves nothing."""
    if value == 0 and all(f != 0 for f in factors) or 0 < abs(value) < _TINY:
        raise _Unsupported("underflow")
    return value


class _Evaluator:
    """Recursive descent, loosest first: sum -> product (* and /) -> signed -> juxtaposition ->
    power -> atom; one value per call."""

    def __init__(self, tokens: list[str], values: dict[str, float]):
        self.tokens, self.i, self.values = tokens, 0, values

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
            value = value + self.product() if self.take() == "+" else value - self.product()
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
        if abs(exponent) > _MAX_EXPONENT or (base < 0 and not float(exponent).is_integer()) or base == 0 >= exponent:
            raise _Unsupported("exponent range")
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
            return float(token)
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
            if radicand < 0:
                raise _Unsupported("negative radicand")
            return radicand ** (1.0 / index)
        raise _Unsupported(token)


def _value(tokens: list[str], values: dict[str, float]) -> float:
    evaluator = _Evaluator(tokens, values)
    value = evaluator.sum()
    if evaluator.peek() is not None:
        raise _Unsupported(f"trailing {evaluator.peek()!r}")
    if not math.isfinite(value) or (value != 0 and not 1e-250 < abs(value) < 1e250):
        raise _Unsupported("range")
    return value


def clearly_different(pred: str, gold: str) -> bool:
    """True when both normalised leaves are in the subset and their values are far apart at one of
    the fixed points; False means "not shown different here", never "equal"."""
    if "%" in pred or "%" in gold:
        return False
    try:
        p_tokens, g_tokens = _tokens(pred), _tokens(gold)
        names = sorted({t for t in p_tokens + g_tokens if t[0].isalpha() or t[1:] in _GREEK})
        if any(n[0].isalpha() and n[0] not in _LETTERS for n in names):
            return False
        for point in _POINTS:
            values = {n: point[k % len(point)] * (1 + k // len(point)) for k, n in enumerate(names)}
            p, g = _value(p_tokens, values), _value(g_tokens, values)
            if abs(p - g) > max(REL_GAP * max(abs(p), abs(g)), ABS_GAP):
                return True
    except (_Unsupported, OverflowError, ZeroDivisionError, ValueError, RecursionError):
        return False
    return False
