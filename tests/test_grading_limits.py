"""eval.grading's limits: values past a double compared exactly, the time limit on pathological
input (from any thread), and the worker pool that enforces it."""

from __future__ import annotations

import threading
import time

import pytest

from limo.eval.grading import is_equivalent

# Values a double cannot hold are compared exactly, never as 0 == 0 or to a float's digits.

BEYOND_FLOATS_DIFFERENT = [  # each was graded equal before: both sides underflowed or agreed to 15 digits
    (r"\frac{1}{2004!}", r"\frac{1}{2006!}"),
    ("10^{-400}", "10^{-500}"),
    (r"\sqrt{2} \cdot 10^{-400}", r"\sqrt{3} \cdot 10^{-400}"),
    ("e^{-1000}", "e^{-1001}"),
    (r"1.00001 \times 10^{-350}", "10^{-350}"),       # a relative tolerance only where a double holds both
]

BEYOND_FLOATS_EQUAL = [
    ("1000!", r"\frac{1001!}{1001}"),
    (r"\frac{1}{2004!}", r"\frac{2005 \cdot 2006}{2006!}"),
    (r"\frac{1}{3} \times 10^{-500}", r"\frac{1}{3 \times 10^{500}}"),
    (r"\sqrt{2} \cdot 10^{-400}", r"\frac{\sqrt{8}}{2} \cdot 10^{-400}"),
    (r"1.5 \times 10^{-500}", r"\frac{3}{2} \cdot 10^{-500}"),
    (r"1.00001 \times 10^{-300}", "10^{-300}"),       # in range: the protocol's 1e-4 still applies
]


@pytest.mark.parametrize("pred, gold", BEYOND_FLOATS_DIFFERENT)
def test_values_past_a_double_differ_exactly(pred, gold):
    assert is_equivalent(pred, gold) is False
    assert is_equivalent(gold, pred) is False


@pytest.mark.parametrize("pred, gold", BEYOND_FLOATS_EQUAL)
def test_values_past_a_double_equal_exactly(pred, gold):
    assert is_equivalent(pred, gold) is True


def test_tiny_is_not_zero():
    assert not is_equivalent("10^{-500}", "0") and not is_equivalent("0", r"\frac{1}{2006!}")


def test_exact_comparison_of_big_values_is_fast():
    assert is_equivalent("x^2", "x*x")  # a warm worker
    start = time.perf_counter()
    assert is_equivalent("1000!", r"\frac{1001!}{1001}") and not is_equivalent("1000!", "1001!")
    assert not is_equivalent("2^{10000}", "2^{10000} + 1")
    assert time.perf_counter() - start < 3.0


# ------------------------------------------------------------------------------------------
# The time limit: pathological input returns False within it, from any thread.

PATHOLOGICAL = [
    (r"10^{10^{10}}", "5"),
    (r"10^{10^{10}} + 1", r"10^{10^{10}}"),  # agree to any float's digits: only the exact value decides, past the limit
    (r"2^{2^{2^{2^{2^{2^{2}}}}}}", "7"),
    ("(" * 3000 + "1" + ")" * 3000, "2"),
    ("+".join(f"x^{{{i}}}" for i in range(2000)), "x"),
]


@pytest.mark.parametrize("pred, gold", PATHOLOGICAL)
def test_pathological_input_is_false_within_the_limit_off_the_main_thread(pred, gold):
    assert is_equivalent("x^2", "x*x")  # a warm worker, so the clock measures the comparison alone
    limit = 1.0
    result, elapsed = {}, {}

    def job():
        start = time.perf_counter()
        result["value"] = is_equivalent(pred, gold, timeout_s=limit)
        elapsed["s"] = time.perf_counter() - start

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert result["value"] is False
    assert elapsed["s"] < limit + 1.0
    assert is_equivalent(r"\frac{\sqrt{8}}{2}", r"\sqrt{2}")  # the pool recovered: a fresh worker answers


def test_worker_failures_raise_instead_of_grading_false():
    from limo.data.suites import load_benchmark
    from limo.eval.equivalence import equivalent
    from limo.eval.timelimit import WorkerError, WorkerPool

    broken = WorkerPool(preload=("limo.eval.no_such_module",))
    with pytest.raises(RuntimeError, match="did not start"):
        broken.call(equivalent, ("1", "1"), 5.0)
    pool = WorkerPool()
    with pytest.raises(WorkerError, match="unknown benchmark 'nope'"):
        pool.call(load_benchmark, ("nope",), 5.0)
    assert pool.call(equivalent, ("x^2", "x*x"), 30.0) is True
    pool.close()


def test_pool_bounds_its_workers_and_a_wait_is_not_charged(monkeypatch):
    """More threads than workers: they queue for the one worker instead of starting more (a start
    costs seconds of imports), and the time spent queueing does not count against the limit."""
    from concurrent.futures import ThreadPoolExecutor

    from limo.eval import timelimit

    started = []
    real = timelimit._Worker

    class Counted(real):
        def __init__(self, preload):
            started.append(preload)
            super().__init__(preload)

    monkeypatch.setattr(timelimit, "_Worker", Counted)
    pool = timelimit.WorkerPool(max_workers=1)
    with ThreadPoolExecutor(3) as threads:
        results = list(threads.map(lambda _: pool.call(time.sleep, (0.6,), 1.0), range(3)))
    pool.close()
    assert results == [None, None, None] and len(started) == 1
