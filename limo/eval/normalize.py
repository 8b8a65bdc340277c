"""Answer text -> a canonical string, and exact numbers out of plain numeric literals.

Everything here is linear-time string work (no sympy, no eval), so it is safe to run on any
model output in the caller's process; the symbolic checks live in limo/eval/symbolic.py behind a
time limit. Two levels of canonical form:
  normalize(s): LaTeX cleaned for parsing (spaces kept between tokens, so `\\pi r` survives);
  key(s):       normalize(s) with every space removed and text case-folded, for string equality.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction

# Characters a model writes in unicode that mean a LaTeX command (or plain ASCII).
# A relative tolerance for rounded quantities, as LIMO's protocol and the Qwen2.5-Math harness use.
REL_TOL = Fraction(1, 10_000)

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00b7": "\\cdot ", "\u22c5": "\\cdot ",
    "\u221a": "\\sqrt", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u2264": "\\leq ", "\u2265": "\\geq ",
    "\u2260": "\\neq ", "\u00b1": "\\pm ", "\u222a": "\\cup ", "\u2229": "\\cap ", "\u00b0": "^\\circ",
    "\uff0c": ",", "\uff08": "(", "\uff09": ")", "\uff1a": ":", "\uff1b": ";", "\u3001": ",", "\u3002": ".",
    "\uff0e": ".", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))

# Commands that only change how text looks: `\text{x}` -> `x`.
# `\mathcal{B}` is the letter B (an option, a point); `\mathbb{R}` is not a styled R and stays.
_WRAPPERS = ("text", "textnormal", "textbf", "textit", "textrm", "texttt", "textsf", "mathrm", "mathbf", "mathit", "mathsf", "mathtt",
             "mathcal", "mathscr", "mbox", "hbox", "operatorname", "boldsymbol", "bm", "displaystyle", "textstyle", "emph")
_WRAPPER_RE = re.compile(r"\\(?:%s)\s*\{" % "|".join(_WRAPPERS))

# Spacing and sizing commands, deleted outright.
_SPACING_RE = re.compile(r"(?<!\\)\\(?:[,;:> ]|quad|qquad|enspace|thinspace|medspace|thickspace|hfill|displaystyle|textstyle)"
                         r"|\\(?:left|right|big|Big|bigg|Bigg)[lr]?(?![a-zA-Z])")
# `10,\!080`, `11,\! 111`, `1{,}000`: a thousands separator the writer marked as one; `,\!` also
# between groups of two (`56,\!01,\!78,\!95,\!760`: Indian digit grouping), `{,}` only before three
# digits (`3{,}5` is a decimal comma, which we never read: see the README's conventions).
_THOUSANDS_SEP_RE = re.compile(r"(\d)\s*(?:,\\!\s*(?=\d{2,3}(?!\d))|\{\s*,\s*\}\s*(?=\d{3}(?!\d)))")
# "12^{th}", "3rd": the ordinal suffix of a number.
_ORDINAL_RE = re.compile(r"(\d)\s*(?:\^\s*\{\s*(?:st|nd|rd|th)\s*\}|\^\s*(?:st|nd|rd|th)|(?:st|nd|rd|th))(?![a-zA-Z])")
# "4343_6", "1011_{2}": digits with their base as a subscript; the digits are the answer.
_BASE_RE = re.compile(r"^(\d+)\s*_\s*\{?\s*\d+\s*\}?$")
_CIRC_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree")
_FRAC_ALIASES_RE = re.compile(r"\\[dt]frac(?![a-zA-Z])")
# `\frac12`, `\frac1{2}`, `\frac{1}2` and `\sqrt2` written without braces.
_FRAC_SHORT_RE = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")
_SQRT_SHORT_RE = re.compile(r"\\sqrt\s*(\d+|[a-zA-Z])")
_RELATIONS = {r"\le": r"\leq", r"\ge": r"\geq", r"\leqslant": r"\leq", r"\geqslant": r"\geq", r"\ne": r"\neq",
              r"\lt": "<", r"\gt": ">", r"\to": r"\rightarrow"}
_ASCII_RELATIONS = {">=": "\\geq ", "<=": "\\leq ", "!=": "\\neq ", "=>": "\\Rightarrow "}
_ASCII_RELATION_RE = re.compile(r">=|<=|!=")
_RELATION_RE = re.compile(r"(\\(?:leqslant|geqslant|le|ge|ne|lt|gt|to))(?![a-zA-Z])")
# `\\frac`, `\\left(`: a command's backslash escaped twice (text that went through a string
# literal); a real `\\` (a matrix's row break) is never followed by one of these names directly.
_DOUBLED_BACKSLASH_RE = re.compile(r"(?<!\\)\\\\(?=(?:[dt]?frac|left|right|sqrt|pi|cdot|times|infty|text|circ)(?![a-zA-Z]))")
_ELLIPSIS_END_RE = re.compile(r"(?:\.\.\.|\\[lc]?dots|\\ldots)\s*\.?$")
_INFINITY_RE = re.compile(r"(?<![a-zA-Z\\])(?:inf(?:inity)?|oo)(?![a-zA-Z])", re.IGNORECASE)

# Units dropped from the end of an answer (after `\text{}` was unwrapped), longest first.
_UNITS = sorted({
    "units", "unit", "square units", "sq units", "cubic units", "degrees", "degree", "radians", "radian",
    "cm", "mm", "km", "m", "meters", "meter", "metres", "metre", "centimeters", "centimeter", "kilometers",
    "inches", "inch", "feet", "foot", "ft", "in", "yards", "yard", "miles", "mile", "mph", "km/h", "m/s",
    "hours", "hour", "hrs", "hr", "h", "minutes", "minute", "min", "mins", "seconds", "second", "sec", "s",
    "days", "day", "weeks", "week", "months", "month", "years", "year", "dollars", "dollar", "cents", "cent",
    "pounds", "pound", "kg", "g", "grams", "gram", "liters", "liter", "litres", "ml", "people", "students",
    "grade", "ways", "points", "marbles", "cookies", "apples", "books", "pages", "times", "steps", "games", "coins",
}, key=len, reverse=True)
_UNIT_ALTERNATION = "|".join(re.escape(u) for u in _UNITS)
_UNIT_RE = re.compile(r"(?:%s)(?:\s*\^\s*\{?[23]\}?)?" % _UNIT_ALTERNATION, re.IGNORECASE)
_POWER_RE = re.compile(r"\s*\^\s*\{?\s*[23]\s*\}?")
# Bare unit words at the end of a number: only words of two letters or more (a lone `m` or `s`
# is as likely a variable as a unit), and never `in`.
_UNIT_TAIL_RE = re.compile(r"(?<=[\d)])\s*(?:%s)(?:\s*\^\s*\{?[23]\}?)?\s*$" % "|".join(
    re.escape(u) for u in _UNITS if len(u) >= 2 and u != "in"))
# `x =`, `f(x) =`, `a_{n} =`, `\theta =`, `x \approx` at the start (not `<=`, `==`).
_NAME = r"\\?[a-zA-Z]+(?:_\{?[\w]+\}?)?(?:\([a-zA-Z, ]*\))?"
# Compound left sides that name what is asked: `(p, q) =`, `|AB| =`, `V_1 : V_2 =`, `\frac{NO}{BO} =`.
_COMPOUND = r"\(\s*%s(?:\s*,\s*%s)+\s*\)|\|\s*[a-zA-Z]+\s*\||%s(?:\s*:\s*%s)+|\\frac\{\s*%s\s*\}\{\s*%s\s*\}" % ((_NAME,) * 6)
_LHS_RE = re.compile(r"^\s*(?:%s|%s)\s*(?:=(?!=)|\\approx)\s*" % (_COMPOUND, _NAME))
_NAME_RE = re.compile(r"\s*%s\s*" % _NAME)
# A word that says "the answer is" before the answer itself.
_ANSWER_IS_RE = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE)


# List separators: `\quad` between two items; semicolons; a set in bare braces.
_QUAD_LIST_RE = re.compile(r"(?<=[\d)\]}])\s*\\q?quad\s*(?=[-\d(\[{])")
_JOIN_RE = re.compile(r"\s+(?:and|or)\s+")
_LABELLED_TUPLE_RE = re.compile(r"^\s*%s\s*=\s*([^,=;]+?)(?:\s*,\s*%s\s*=\s*([^,=;]+?))+\s*$" % (_NAME, _NAME))
_LABELLED_VALUE_RE = re.compile(r"%s\s*=\s*([^,=;]+)" % _NAME)
# A number followed by words (of three letters or more), none of them joining items of a list.
_TRAILING_WORDS_RE = re.compile(r"([-+]?\d[\d,]*(?:\.\d+)?)\s+((?:[A-Za-z]{3,}\s*)+)")
_GLUE_WORDS = {"and", "nor", "plus", "minus", "times", "over", "divided", "mod", "choose", "not"}


def _top_level(s: str, ch: str) -> list[int]:
    """Positions of `ch` outside every bracket pair."""
    depth, found = 0, []
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == ch and depth == 0:
            found.append(i)
    return found


def _semicolons(s: str) -> str:
    r"""Semicolons that separate items: `-12;-11;-10` and `(0;-2;6)` (no comma anywhere) read as
    commas; `p=5,q=2;p=7,q=2` (labelled tuples) as `(5,2), (7,2)`."""
    if ";" not in s:  # `\;` (spacing) is gone by now
        return _labelled_tuples(s, _JOIN_RE) if _JOIN_RE.search(s) else s
    if "," not in s:
        return s.replace(";", ",")
    return _labelled_tuples(s, re.compile(";"))


def _labelled_tuples(s: str, separator: re.Pattern) -> str:
    """`p=5,q=2 ; p=7,q=2` (or joined by "and", "or") -> `(5, 2), (7, 2)` when every part is one."""
    cuts = [m for m in separator.finditer(s) if m.start() in _top_level(s, s[m.start()])]
    if not cuts:
        return s
    bounds = [0, *(x for m in cuts for x in (m.start(), m.end())), len(s)]
    parts = [s[a:b] for a, b in zip(bounds[::2], bounds[1::2])]
    if all(_LABELLED_TUPLE_RE.match(p) for p in parts):
        return ", ".join("(" + ", ".join(v.strip() for v in _LABELLED_VALUE_RE.findall(p)) + ")" for p in parts)
    return s


def _bare_braces(s: str) -> str:
    r"""`{-3, 3}`: a set written in bare braces (a grouping brace around the whole answer, with a
    top-level comma inside) -> `\{-3, 3\}`."""
    t = s.strip()
    if not (t.startswith("{") and t.endswith("}")) or not _top_level(t[1:-1], ","):
        return s
    depth = 0
    for i, c in enumerate(t):  # the first brace must close at the very end
        depth += c == "{"
        depth -= c == "}"
        if depth == 0 and i < len(t) - 1:
            return s
    return "\\{" + t[1:-1] + "\\}"


def _unwrap(s: str) -> str:
    r"""`\text{abc}` -> `abc` for every wrapper command, braces matched (nesting allowed); a wrapped
    unit after a number (`5\text{ cm}^2`, `6.5 \mathrm{~m}`) is dropped with its power."""
    out: list[str] = []
    last = ""  # the last non-space character written so far
    i = 0
    while True:
        m = _WRAPPER_RE.search(s, i)
        if m is None:
            out.append(s[i:])
            return "".join(out)
        before = s[i:m.start()]
        out.append(before)
        last = before.rstrip()[-1:] or last
        depth, j = 1, m.end()
        while j < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            j += 1
        inner = s[m.end():j - 1] if depth == 0 else s[m.end():]
        if last and last in "0123456789})" and _UNIT_RE.fullmatch(inner.replace("~", " ").replace("\\,", " ").strip()):
            power = _POWER_RE.match(s, j)
            j = power.end() if power else j
            out.append(" ")
        else:
            text = _unwrap(inner)
            out.append(" " + text + " ")
            last = text.rstrip()[-1:] or last
        i = j


def strip_math_delimiters(s: str) -> str:
    r"""`$x$`, `\(x\)`, `\[x\]` -> `x` (only when the delimiters wrap the whole string)."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            return s[len(left):len(s) - len(right)].strip()
    return s


def normalize(s: str, *, keep_lhs: bool = False) -> str:
    r"""Clean an answer for comparison: delimiters, unicode, wrappers, spacing, degrees, units, `x =`
    (`keep_lhs`: not `x =`, for comparing whole equations). Memoised: a grade normalises the same
    strings several times, and the K samples of one problem share their gold."""
    return _normalize(str(s), keep_lhs)


@functools.lru_cache(maxsize=1 << 14)
def _normalize(s: str, keep_lhs: bool) -> str:
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group()], str(s))
    s = strip_math_delimiters(s.replace("\n", " "))
    s = s.replace("\\$", " ").replace("$", " ")
    s = _DOUBLED_BACKSLASH_RE.sub(r"\\", s)
    s = _ANSWER_IS_RE.sub("", s)
    s = _unwrap(s)
    s = _THOUSANDS_SEP_RE.sub(r"\1", s)
    s = _QUAD_LIST_RE.sub(", ", s)  # `(1,2) \quad (3,4)`: spacing that separates the items of a list
    s = _SPACING_RE.sub(" ", s.replace("\\!", "")).replace("~", " ")
    s = _semicolons(s)
    s = _bare_braces(s)
    s = _CIRC_RE.sub("", s)
    s = _ORDINAL_RE.sub(r"\1", s)
    s = _FRAC_ALIASES_RE.sub(r"\\frac", s)
    s = _FRAC_SHORT_RE.sub(lambda m: r"\frac{%s}{%s}" % (m.group(1).strip("{}"), m.group(2).strip("{}")), s)
    s = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", s)
    s = _RELATION_RE.sub(lambda m: _RELATIONS[m.group(1)], s)
    s = _ASCII_RELATION_RE.sub(lambda m: _ASCII_RELATIONS[m.group()], s)  # `x >= 5` is `x \geq 5`
    s = _INFINITY_RE.sub(r"\\infty", s)
    s = s.replace("\\%", "%").replace("\\#", " ")
    s = re.sub(r"\s+", " ", s).strip()
    if not _ELLIPSIS_END_RE.search(s):  # `1, 2, 3, \ldots` is a sequence that goes on, not `1, 2, 3`
        s = s.rstrip(".,").strip()
    previous = None
    while previous != s:  # "5 \text{ cm}^2", "10 dollars", "90^\circ" -> the number
        previous = s
        s = _UNIT_TAIL_RE.sub("", s).strip()
    if (m := _TRAILING_WORDS_RE.fullmatch(s)) and not _GLUE_WORDS & set(m.group(2).lower().split()):
        s = m.group(1)  # "64 square feet", "17 any text": a number, then words about it
    head, approx, _ = s.partition("\\approx")
    if approx and head.strip() and not _NAME_RE.fullmatch(head):
        s = head.strip()  # `x = \frac{1}{3} \approx 0.33`: the exact value is the answer, not its rounding
    if s.count("=") + s.count("\\approx") == 1 and not keep_lhs:
        s = _LHS_RE.sub("", s)
    return _BASE_RE.sub(r"\1", s.strip())


def left_side(s: str) -> str | None:
    """The name an answer gives its value (`x` of `x = 5`, `\\sin(x)` of `\\sin(x) = 0.3`, `(p,q)` of
    `(p, q) = (3, 2)`), canonical; None when it is no `name = value`. Two answers naming different
    left sides are different answers, whatever their values."""
    s = normalize(s, keep_lhs=True)
    if s.count("=") != 1 or s.count("\\approx") or re.search(r"[<>!]=|==|\\[lg]eq|\\neq", s):
        return None
    m = _LHS_RE.match(s)
    if m is None:
        return None
    name = m.group(0).rstrip().removesuffix("=").rstrip()
    return re.sub(r"_\{(\w)\}", r"_\1", name.replace(" ", ""))


def key(s: str) -> str:
    """normalize(s) without spaces and with text case-folded: the string-equality form."""
    s = normalize(s).replace(" ", "")
    return s.casefold() if re.fullmatch(r"[A-Za-z]{2,}", s) else s


# --------------------------------------------------------------------------------------------
# Plain numeric literals -> exact fractions.

# Exponents past this are not expanded: 1e999999999 would take the host down, not answer anything.
MAX_EXPONENT = 400

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_INT_RE = re.compile(r"[-+]?\d+")
_DECIMAL_RE = re.compile(_NUM)
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?")
_SCI_RE = re.compile(r"(%s)\s*(?:[eE]\s*([-+]?\d+)|(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?)" % _NUM)
_POW10_RE = re.compile(r"10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?")
_FRAC_RE = re.compile(r"([-+]?)\s*\\frac\{\s*(%s)\s*\}\{\s*(%s)\s*\}" % (_NUM, _NUM))
_SLASH_RE = re.compile(r"(%s)\s*/\s*(%s)" % (_NUM, _NUM))
# A mixed number: `7\frac{3}{11}`, or in plain text with a space, `3128 1/2`.
_MIXED_RE = re.compile(r"([-+]?)(\d+)(?:\s*\\frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}|\s+(\d+)\s*/\s*(\d+))")


@dataclass(frozen=True)
class Number:
    """An exact value read from a literal; `decimal` when it was written with a decimal point or
    in scientific notation (a rounded quantity, compared with a tolerance), `percent` when it
    carried a % sign."""

    value: Fraction
    decimal: bool = False
    percent: bool = False


def _fraction(text: str) -> Fraction:
    return Fraction(text.replace("+", "")) if text not in ("", "+", "-") else Fraction(1)


def _power_of_ten(exponent: str) -> Fraction | None:
    e = int(exponent)
    return None if abs(e) > MAX_EXPONENT else Fraction(10) ** e


def parse_number(s: str) -> Number | None:
    r"""The value of `s` if it is one plain numeric literal (integer, decimal, `a/b`, `\frac{a}{b}`,
    mixed number `7\frac{3}{11}`, `1,000`, `4.5e33`, `4.5 \times 10^{33}`, `50\%`), else None."""
    s = normalize(s).strip()
    percent = s.endswith("%")
    s = s.rstrip("%").strip()
    if len(s) > 200:
        return None
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace("{,}", "").replace(",", "")
    s = s.replace("{,}", "")
    try:
        if _INT_RE.fullmatch(s) and len(s) <= 1000:
            return Number(Fraction(int(s)), percent=percent)
        if _DECIMAL_RE.fullmatch(s):
            return Number(_fraction(s), decimal=True, percent=percent)
        if m := _SCI_RE.fullmatch(s):
            scale = _power_of_ten(m.group(2) or m.group(3))
            return None if scale is None else Number(_fraction(m.group(1)) * scale, decimal=True, percent=percent)
        if m := _POW10_RE.fullmatch(s):
            scale = _power_of_ten(m.group(1))
            return None if scale is None else Number(scale, percent=percent)
        if m := _MIXED_RE.fullmatch(s):
            whole, num, den = int(m.group(2)), int(m.group(3) or m.group(5)), int(m.group(4) or m.group(6))
            if den != 0 and num < den:
                sign = -1 if m.group(1) == "-" else 1
                return Number(sign * (whole + Fraction(num, den)), percent=percent)
            return None
        for pattern in (_FRAC_RE, _SLASH_RE):
            if m := pattern.fullmatch(s):
                sign = -1 if pattern is _FRAC_RE and m.group(1) == "-" else 1
                num, den = _fraction(m.group(2 if pattern is _FRAC_RE else 1)), _fraction(m.group(3 if pattern is _FRAC_RE else 2))
                if den == 0:
                    return None
                decimal = "." in m.group(0)
                return Number(sign * num / den, decimal=decimal, percent=percent)
    except (ValueError, ZeroDivisionError):
        return None
    return None
