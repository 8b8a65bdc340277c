"""eval.screen: the float screen that rejects clearly different leaves before sympy.

Its one promise: when it says "different", the symbolic comparison it skips says "not equal" too.
Each case below is checked against eval.symbolic itself (run here without the time limit: every
case is small), and the screen must decline whatever it cannot read exactly as latex2sympy does.
"""

from __future__ import annotations

import pytest

from limo.eval.normalize import normalize
from limo.eval.screen import clearly_different

DIFFERENT = [
    (r"\sqrt{3}", "2"),
    (r"70 + 10\sqrt{13}", r"70 \sqrt{2}"),
    ("4n^2", "8n^2 + 4n + 1"),
    (r"\frac{1}{2n}", r"\frac{1}{2 n+2}"),
    ("1/2n", r"\frac{n}{2}"),                    # juxtaposition binds tighter than /, as in latex2sympy
    (r"54 + 18\pi", r"18+2\pi"),
    (r"\lfloor \frac{n^2}{2} \rfloor", r"\lfloor\frac{n^2}{2}\rfloor + 1"),
    (r"\frac{a_1^9}{(2a_1 - 1)^9}", "-1"),
    (r"\frac{2 - 3\omega + \omega^{-1994}}{2(1 - \omega)(1 - \omega^2)}", r"\frac{1997}{2}"),  # sympy: past 5 s
    (r"\sqrt[3]{2} \cdot 3", "4"),
    ("0.3333", r"\frac{1}{3} + 0.01"),
    ("2^{2022}", "-1"),                          # past a double: exact rationals
    ("10^{20}+1-10^{20}", "2"),                  # exact: no cancellation
    ("1 + 264i", "1+274i"),                      # i is the imaginary unit: complex values
    (r"\frac{1+265i}{1+263i}", "1+274i"),
    (r"-\frac{11}{5}-\frac{2}{5}i", "1+2i"),
]

NOT_SHOWN_DIFFERENT = [
    ("x^2", "x x"),                              # equal
    ("1/2n", r"\frac{1}{2n}"),
    ("0.33333", r"\frac{1}{3}"),                 # within the protocol's tolerance: sympy decides
    ("0.1234561", "0.1234569"),                  # math-verify rounds decimals to 6 places
    ("i^2", "-1"),                               # equal at i = sqrt(-1): sympy decides
    ("1+2i", "2i+1"),
    (r"\sqrt{i}", "1"),                          # no roots, floors or non-integer powers of complex values
    (r"\lfloor i \rfloor", "0"),
    ("i_1 + 1", "2"),                            # a subscripted i is a variable the screen leaves alone
    ("e^{2}", "8"),                              # e, j, E, I: left to sympy
    (r"e^{2}", "7.389"),
    ("f(x)", "5"),                               # function or product: the parser's choice
    ("2 3", "6"),                                # latex2sympy reads `2 3` as 5
    ("2^{2022}", "2^{2022}+1"),                  # exact, but within the relative tolerance
    ("10^{10^{10}}", "1"),                       # past the exact evaluation's size bound
    ("10^{20}+1-10^{20}", "1"),                  # equal, exactly (0 in floats)
    ("(x+10^{20})-10^{20}", "x"),                # equal; floats lose x to cancellation: no evidence
    ("xi", r"\xi"), ("phi", r"\phi"), ("mu", r"\mu"), ("alpha", r"\alpha"), ("pi", r"\pi"),  # a bare Greek name: sympy's call
    (r"\frac{1}{2^{2000}}", r"\frac{3}{2^{2000}}"),  # exact, but closer than the absolute gap
    (r"x^{-2000} + 1", "1"),                     # an underflowed term is no evidence
    (r"\log 2", "1"),                            # functions are not in the subset
    ("5!", "120"),
    (r"50\%", "0.5"),
    ("x = 1", "1"),
]


@pytest.mark.parametrize("pred, gold", DIFFERENT)
def test_screen_rejects_clearly_different_and_sympy_agrees(pred, gold):
    from limo.eval.symbolic import symbolic_equal

    p, g = normalize(pred), normalize(gold)
    assert clearly_different(p, g) and clearly_different(g, p)
    if "omega" not in pred:  # the one sympy cannot finish within the grader's limit
        assert symbolic_equal(p, g) is False


@pytest.mark.parametrize("pred, gold", NOT_SHOWN_DIFFERENT)
def test_screen_declines_what_it_cannot_settle(pred, gold):
    assert clearly_different(normalize(pred), normalize(gold)) is False
