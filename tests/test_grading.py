"""eval.grading: answer extraction and equivalence (its limits: test_grading_limits.py; pass@k: test_pass_at_k.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest

from limo.eval.grading import choice_letter, extract_answer, grade, is_equivalent
from limo.eval.normalize import parse_number
from tests.conftest import ROOT

# ------------------------------------------------------------------------------------------
# extract_answer


@pytest.mark.parametrize("text, want", [
    (r"so \boxed{1} at first, but finally \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"nested braces \boxed{\begin{pmatrix} 1 \\ {2} \end{pmatrix}} end", r"\begin{pmatrix} 1 \\ {2} \end{pmatrix}"),
    (r"a set \boxed{\{1, 2\}} with escaped braces", r"\{1, 2\}"),
    (r"braceless $\boxed 5$.", "5"),
    (r"braceless at the end \boxed 42.", "42"),
    (r"\fbox{7}", "7"),
    (r"\boxed {  3 }", "3"),
    (r"inner one wins \boxed{\boxed{9}}", "9"),
    (r"an empty box is no answer: \boxed{7} then \boxed{}", "7"),
    (r"cut at the length limit: \boxed{12} ... \boxed{\frac{3", "12"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("text", ["no box at all, the answer is 5", r"\boxed{unclosed", r"\boxed{}", "", r"\boxedfoo{3}"])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


def test_extract_answer_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        extract_answer(None)


def test_extract_answer_is_linear_on_hostile_text():
    text = r"\boxed{" * 50_000 + "x"
    start = time.perf_counter()
    assert extract_answer(text) is None
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------------------
# is_equivalent

EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac12", r"\frac{1}{2}"),
    (r"\frac{-35}{9}", r"-\frac{35}{9}"),
    (r"\frac{2240}{78125}", r"\frac{448}{15625}"),
    ("x = 5", "5"),
    ("5", "x=5"),
    (r"x \approx 600", "600"),
    ("2x", "$f(x)=2 x$"),
    ("90", r"90^\circ"),
    (r"5 \text{ cm}^2", "5"),
    ("27 miles", "27"),
    (r"12^{\text{th}}\text{ grade}", "12"),
    ("10080", r"10,\!080"),
    ("11111111100", r"11,\! 111,\! 111,\! 100"),
    ("1,000,000", "1000000"),
    ("Evelyn", r"\text{Evelyn}"),
    (r"\text{Even}", "even"),
    ("4343", "4343_6"),
    (r"7 \frac{3}{11}", r"\frac{80}{11}"),
    ("0.0000672", ".0000672"),
    (r"4.5 \times 10^{33}", "4.5e33"),
    (r"50\%", "0.5"),
    (r"10\%", "10"),
    ("0.33333", r"\frac{1}{3}"),
    ("0.8660", r"\frac{\sqrt{3}}{2}"),
    ("3√13", r"3\sqrt{13}"),
    ("12π", r"12\pi"),
    ("27", 27.0),
    ("-1", -1),
    ("(x+1)^2", "x^2+2x+1"),
    (r"\frac{\cos x}{\sin x}", r"\cot x"),
    (r"\frac{(2n)!}{(n!)^2}", r"\binom{2n}{n}"),
    ("2^8", "256"),
    (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
    ("(3/5, 8/3]", r"\left(\frac{3}{5},\frac{8}{3}\right]"),
    ("[-2, 7]", r"x \in [-2,7]"),
    (r"x \in (0, 9) \cup (9, 36)", r"(0,9) \cup (9,36)"),
    ("k < -5", r"(-\infty,-5)"),
    (r"-1 \leq t < 2", "[-1, 2)"),
    (r"x < 1 \text{ or } x > 2", r"(-\infty, 1) \cup (2, \infty)"),
    ("-2, 1", "1,-2"),
    (r"7 \text{ and } -5", "-5,7"),
    (r"\{1, 2\}", "1, 2"),
    (r"3 + 2\sqrt{2}, 3 - 2\sqrt{2}", r"3 \pm 2 \sqrt{2}"),
    (r"\pm 1, \pm 7", "1,-1,7,-7"),
    (r"(3, 2), (3, -2), (-3, 2), (-3, -2)", "$(3,2),(-3,2),(3,-2),(-3,-2)$"),
    (r"\left(\frac{1}{3}, -2, 5\right)", r"$\frac{1}{3},-2,5$"),
    (r"\begin{pmatrix} -\frac{1}{3} \\ \frac{2}{3} \end{pmatrix}", r"\begin{pmatrix} -1/3 \\ 2/3 \end{pmatrix}"),
    (r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}", r"\begin{bmatrix} 1 & 0 \\ 0 & 1 \end{bmatrix}"),
    ("y = 2x + 3", "2x+3"),
    ("x^2 + y^2 - 1 = 0", "x^2+y^2=1"),
    ("C", r"\text{(C)}"),
    (r"\textbf{(B)}\ 3(1 + r/10)^x = 7", r"\text{(B)}"),
    ("A. 10^-4 eV", "A"),
]

NOT_EQUIVALENT = [
    (r"[2, \infty)", r"(2,\infty)"),                         # bracket types are part of an interval
    (r"\left(\frac{3}{5}, \frac{8}{3}\right)", r"\left(\frac{3}{5},\frac{8}{3}\right]"),
    ("102019", "102018"),                                     # integers are exact, no relative tolerance
    ("204.01", "204"),
    ("1", "100"),                                             # no silent percentage rescaling
    ("2000", "20"),
    ("0.33", r"\frac{1}{3}"),                                 # outside 1e-4
    (r"\sqrt{2}", "1.41"),
    ("(1, 2)", "(2, 1)"),                                     # tuples are ordered
    ("(1, 2, 3)", "1, 2"),
    ("x", "y"),
    ("-3", "-3 m"),                                           # a lone letter is a variable, not a unit
    ("tsae", "east"),                                         # words are text, not products of symbols
    (r"\text{odd}", r"\text{even}"),
    ("20x - 28y + 44z + 16 = 0", "5x - 7y + 11z + 4 = 0"),   # same plane, not the asked-for form
    ("f(x) = x", "$f(x)=x$,$f(x)=2-x$"),                      # one of two solutions
    (r"r = 4, \frac{7}{2}", "4"),                             # an extra, wrong solution
    (r"\frac{1}{4} \left[ \cos^2 \left( \frac{2 \pi}{5} \right) + \cos \left( \frac{2 \pi}{5} \right) \cos "
     r"\left( \frac{2 \pi}{15} \right) \right]", r"\frac{1}{16}"),  # not evaluated, whatever its value
    ("B", "A"),
    ("3", "C"),
    (r"\{-1, -1, 2\}", r"\{1\pm\sqrt{5},-2\}"),
    ("", "5"),
    ("   ", "5"),
]


# Answers that are relations, not values (limo/eval/relations.py), and the forms around them.
RELATIONS_EQUIVALENT = [
    ("2x+4y-3=0", r"y=-\frac{1}{2}x+\frac{3}{4}"),          # a line solved for y: any rescaling
    (r"y=-\frac{1}{2}x+\frac{3}{4}", "2x+4y-3=0"),
    ("34x+45y-20z+100=0", "-34x-45y+20z-100=0"),            # every term negated
    ("x + 2y = 4", "4 = 2y + x"),                           # sides swapped
    ("x<1", "-x>-1"),
    ("-x>-1", "x<1"),
    ("2x < 2", "x < 1"),                                     # an inequality scaled by c > 0
    (r"a \geq 3", r"-2a \leq -6"),
    (r"-2 \le x \le 7", r"x \in [-2,7]"),
    (r"-2 \le x \le 7", "[-2,7]"),
    ("k<-5", r"(-\infty,-5)"),
    (r"x=\frac{1}{3}\approx 0.33", r"\frac{1}{3}"),          # a chain is judged by its exact value
    (r"\frac{1}{3} \approx 0.333", r"\frac{1}{3}"),
    (r"5\textnormal{ cm}", "5"),                              # \textnormal and \mbox unwrap like \text
    (r"5\textnormal{cm}^2", "5"),
    (r"5 \mbox{ cm}", "5"),
]

RELATIONS_NOT_EQUIVALENT = [
    ("20x - 28y + 44z + 16 = 0", "5x - 7y + 11z + 4 = 0"),   # both integer forms: the scale is the answer
    ("2y = 4x + 6", "y = 2x + 3"),
    ("x<1", "x>1"),
    ("x < 1", r"x \leq 1"),
    ("-2x < 2", "x < -1"),                                   # c < 0 flips an inequality
    ("2x+4y-3=0", "2x+4y+3=0"),
    (r"x=\frac{1}{3}\approx 0.33", "0.33"),                  # the rounding is not the answer
]


@pytest.mark.parametrize("pred, gold", RELATIONS_EQUIVALENT)
def test_relations_equivalent(pred, gold):
    assert is_equivalent(pred, gold) is True


@pytest.mark.parametrize("pred, gold", RELATIONS_NOT_EQUIVALENT)
def test_relations_not_equivalent(pred, gold):
    assert is_equivalent(pred, gold) is False
    assert is_equivalent(gold, pred) is False


@pytest.mark.parametrize("pred, gold", EQUIVALENT)
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold) is True


@pytest.mark.parametrize("pred, gold", NOT_EQUIVALENT)
def test_not_equivalent(pred, gold):
    assert is_equivalent(pred, gold) is False


def test_many_threads_grade_at_once():
    pairs = EQUIVALENT[:16] + NOT_EQUIVALENT[:16]
    want = [True] * 16 + [False] * 16
    got = [None] * len(pairs)

    def job(first):
        for i in range(first, len(pairs), 4):
            got[i] = is_equivalent(*pairs[i])

    threads = [threading.Thread(target=job, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == want


def test_no_answer_is_never_right():
    assert is_equivalent(None, "5") is False
    assert grade("the answer is 5", ["5"]) == (None, False)
    assert grade(r"so \boxed{5}", ["7", "5"]) == ("5", True)


@pytest.mark.parametrize("gold", [None, True, ["5"], {"a": 1}])
def test_bad_gold_names_its_type(gold):
    with pytest.raises(TypeError, match="gold answer"):
        is_equivalent("5", gold)


def test_the_grading_process_never_imports_sympy():
    """sympy and math-verify live in the workers; torch only comes with a generator that needs it."""
    code = "import sys, limo.eval.grading, limo.eval.run; print(sorted(m for m in ('sympy', 'math_verify', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_choice_letter():
    assert [choice_letter(t) for t in ["C", "(C)", r"\text{C}", "C. 5", "C: five", "c", "Cat", "5"]] == \
        ["C", "C", "C", "C", "C", None, None, None]
    hedges = ["A or B", r"A \text{ and } C", "(A) and (C)", "A B", "A, B", "A/B", "both A and D"]
    assert [choice_letter(t) for t in hedges] == [None] * len(hedges)
    assert [choice_letter(t) for t in ["C. A triangle", "B. 3 and 4", "(D) all of the above"]] == ["C", "B", "D"]
    assert not is_equivalent("A or B", "A") and is_equivalent("(A)", "A")


def test_pathological_nesting_is_false_fast_in_the_caller():
    start = time.perf_counter()
    assert not is_equivalent("\\text{" * 1200 + "1" + "}" * 1200, "1")
    assert not is_equivalent("\\text{" * 20000, "1")
    assert is_equivalent("x" * 2000, "x" * 2000)  # long answers compare as exact strings
    assert time.perf_counter() - start < 1.0


def test_number_literals_do_not_expand_huge_exponents():
    start = time.perf_counter()
    assert parse_number("1e999999999") is None
    assert parse_number(r"10^{999999999}") is None
    assert parse_number("9" * 5000) is None
    assert time.perf_counter() - start < 1.0
    assert parse_number("1e3").value == 1000 and parse_number("1e3").decimal
    assert parse_number(r"-\frac{3}{4}").value == Fraction(-3, 4)


# Wrong answers the grader used to accept (issue 26's table, from other graders' public suites):
# an equation's left side is part of the answer, and an option letter is never a factor.
@pytest.mark.parametrize("pred, gold", [
    ("y=5", "x=5"),
    (r"\cos(x)=\frac{42}{59}", r"\sin(x)=\frac{42}{59}"),
    (r"\mathrm{E}*2", "E"),
    ("f(x)=2x", "g(x)=2x"),
    ("(p,q)=(3,2)", "(a,b)=(3,2)"),
    (r"C \cdot 3", "C"),
])
def test_a_different_left_side_or_a_letter_in_a_product_is_wrong(pred, gold):
    assert not is_equivalent(pred, gold)


# ... while a bare value still matches a gold `name = value` whose left side is what is asked,
# simple or compound, and the same left side written two ways is the same.
@pytest.mark.parametrize("pred, gold", [
    ("7:32", "S=7:32"), ("S=7:32", "7:32"), ("(3,2)", "(p,q)=(3,2)"), ("(p, q) = (3, 2)", "(3,2)"), ("1", "|AB|=1"),
    ("|AB| = 1", "1"), ("3:2", "V_1:V_2=3:2"), ("a_{1}=5", "a_1=5"), (r"\sin(x)=\frac{1}{2}", r"\sin(x) = 0.5"),
    ("x=5", "5"), ("E", "E"), ("(E)", "E"), ("C. 5", "C"),
])
def test_a_bare_value_matches_a_named_gold_and_the_same_left_side_matches(pred, gold):
    assert is_equivalent(pred, gold)


# Right answers the grader used to reject (issue 26, part 2), each kind as other graders' public
# suites check it: separators, list glue, trailing words, bare-brace sets, chained inequalities
# around a function, complex arithmetic.
@pytest.mark.parametrize("pred, gold", [
    ("-12;-11;-10", "-12,-11,-10"), ("(0;-2;6)", "(0,-2,6)"), ("p=5,q=2;p=7,q=2", "(5,2),(7,2)"),
    (r"(1,2) \text{ or } (3,4)", "(1,2),(3,4)"), ("(1,2) and (3,4)", "(1,2),(3,4)"), (r"(1,2) \quad (3,4)", "(1,2),(3,4)"),
    ("(1,2),(1,2),(3,4)", "(1,2),(3,4)"),
    ("64 square feet", "64"), ("64", "64 square feet"), (r"17\text{ any text}", "17"), ("17", r"17\text{ any text}"),
    (r"\pm 3", "{-3,3}"), ("{-3,3}", r"\pm 3"),
    ("0<f(x)<1", "(0,1)"),
    ("i(2-i)", "1+2i"), ("1+2i", "i(2-i)"), ("(1+i)^2", "2i"),
])
def test_right_answers_written_another_way_are_accepted(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("i(2-i)", "2+i"), ("3 and 4", "3"), ("0<f(x)<2", "(0,1)"), ("64 square feet", "65"), ("{-3,3}", "3"),
    ("2,2,3", "2,3"), ("(1,2),(1,2)", "(1,2),(3,4)"), ("-12;-11", "-12,-11,-10"),
])
def test_the_new_readings_do_not_accept_wrong_answers(pred, gold):
    assert not is_equivalent(pred, gold)


# ------------------------------------------------------------------------------------------
# Issue 26, part 3: the kinds the adapted suites (tests/graders, test_peer_suites.py) found


@pytest.mark.parametrize("text, want", [
    (r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}", "(2, 2), (6, 2)"),
    (r"\boxed{1},\boxed{2},\boxed{3}", "1, 2, 3"),
    (r"the answers are \boxed{1} and \boxed{-2}.", "1, -2"),
    (r"\(\boxed{1}\) and \(\boxed{-2}\).", "1, -2"),                     # across formulas, when "and" lists them
    (r"\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}", "(3, 3), (1, 1)"),
    (r"$$\boxed{20}$$ \boxed{143}", "143"),                                # a try, then the answer: not a list
    (r"\boxed{3}. Wait, that is wrong: \boxed{5}", "5"),                   # a sentence between them: not a list
    (r"so \boxed{7} \text{ is 7 } \boxed{8}", "8"),                        # a \text{} with a digit says something
])
def test_boxes_listed_together_are_one_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("pred, gold", [
    ("3128 1/2", "3128.5"),                                   # a mixed number in plain text
    (r"56,\!01,\!78,\!95,\!760", "56017895760"),              # `,\!` grouping digits in twos
    (r"14 {, }916", "14916"),
    (r"\mathcal{B}", "B"),
    ("C", "C. x = 42"), ("(B)", "B) 3"),                      # a gold that is an option and its content
    (r"\frac{1}{3},", r"\frac{1}{3}"),                        # a trailing comma
    ("(7,11), (11,7)", "(11,7)or(7,11)"),
    (r"\frac{1}{\sqrt{6}}", r"\frac{NO}{BO}=\frac{1}{\sqrt{6}}"),
    ("p=5,q=2;p=7,q=2", r"p = 5, q = 2 \quad \text{and} \quad p = 7, q = 2"),
    (r"\\left(\\frac{1}{5},\\frac{1}{6}\\right)", r"\left( \frac{1}{5}, \frac{1}{6} \right)"),  # backslashes escaped twice
    ("x >= 5", r"x \geq 5"), ("x != 3", r"x \neq 3"),
    (r"\left[\begin{array}{cc}1 & 2 \\3 & 4\end{array}\right]", r"\begin{pmatrix}1 & 2 \\3 & 4\end{pmatrix}"),
])
def test_right_answers_the_suites_found_are_accepted(pred, gold):
    assert is_equivalent(pred, gold) and is_equivalent(gold, pred)


@pytest.mark.parametrize("pred, gold", [
    ("E'", "E"), ("f'(x)", "f(x)"),                           # a prime is part of the name
    ("1, 2, 3, ...", "1, 2, 3"), (r"1, 2, 3, \ldots", "1, 2, 3"),  # a sequence that goes on
    ("D", "C. x = 42"), ("2 1/3", "2.5"), ("3 1/2", "1.5"),        # 3 1/2 is three and a half, never 3 * 1/2
    (r"\mathbb{R}", "R"),                                     # the reals, not a styled letter
    ("3{,}5", "3.5"),                                         # a decimal comma is not read
    (r"\frac{1}{\sqrt{6}}", r"\frac{NO}{CO}=\frac{1}{\sqrt{5}}"),
    ("(5, 2), (7, 3)", r"p = 5, q = 2 \quad \text{and} \quad p = 7, q = 2"),
    ("x <= 5", r"x \geq 5"),
])
def test_the_suites_wrong_answers_and_near_misses_are_refused(pred, gold):
    assert not is_equivalent(pred, gold) and not is_equivalent(gold, pred)
