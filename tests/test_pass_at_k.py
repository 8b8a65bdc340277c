"""eval.grading.pass_at_k against the exact binomial formula."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from limo.eval.grading import pass_at_k


def _pass_at_k_exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 16, 37, 200])
def test_pass_at_k_matches_exact_binomials(n):
    for c in range(n + 1):
        for k in sorted({1, 2, 4, 8, 16, n // 2 or 1, n} & set(range(1, n + 1))):
            want = _pass_at_k_exact(n, c, k)
            got = pass_at_k(n, c, k)
            assert abs(Fraction(got) - want) <= Fraction(1, 10**12) * max(want, Fraction(1, 10**300)), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(16, 0, 1) == 0.0
    assert pass_at_k(16, 16, 16) == 1.0
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16, rel=1e-15)
    assert pass_at_k(16, 10, 8) == 1.0  # fewer than k wrong samples: every k-subset has a right one
    assert pass_at_k(10**6, 1, 1) == pytest.approx(1e-6, rel=1e-13)  # no cancellation in 1 - (1 - 1e-6)
    got = pass_at_k(10_000, 37, 1000)  # comb(10000, 1000) has 1400+ digits: never formed
    assert abs(Fraction(got) - _pass_at_k_exact(10_000, 37, 1000)) < Fraction(1, 10**12)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)
