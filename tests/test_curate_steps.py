"""curate: the difficulty band's edges, the chain scorer on crafted chains, selection with caps."""

from __future__ import annotations

import random

import pytest

from limo.curate.difficulty import draw_and_grade, filter_by_band, parse_band
from limo.curate.score import DEFAULT_WEIGHTS, parse_weights, percentiles, score_chains, traits
from limo.curate.select import select_top
from limo.eval.generators import Completion


def _env(uid: str, question: str = "q", chain: str = r"so \boxed{1}", answer: str | None = "1", source: str = "a.jsonl") -> dict:
    return {"uid": uid, "source": source, "question": question, "chain": chain, "answer": answer, "record": {"id": uid}}


# ------------------------------------------------------------------------------------------
# difficulty: pass rates from graded samples, kept inside [lo, hi] with both edges included


class ScriptedModel:
    """Problem p<c> answers right in its first c of K samples; records every request it saw."""

    def __init__(self):
        self.requests = []

    def __call__(self, requests):
        self.requests += requests
        return [Completion(rf"\boxed{{{1 if self._right(r) else 2}}}", "stop", 3) for r in requests]

    def _right(self, request) -> bool:
        c = int(request.user[1:])
        seen = [r for r in self.requests if r.user == request.user]
        return seen.index(request) < c


def test_band_edges_are_kept_and_each_side_has_its_reason(tmp_path):
    pool = [_env(f"u{c}", question=f"p{c}") for c in range(5)]  # pass rates 0, 1/4, 2/4, 3/4, 1
    model = ScriptedModel()
    settings = {"model": "scripted"}
    results = draw_and_grade(pool, model, tmp_path, samples=4, temperature=0.7, max_tokens=8, seed=0, batch_size=3, settings=settings)
    assert len(model.requests) == 20 and len({r.seed for r in model.requests}) == 20
    kept, gone, stats = filter_by_band(pool, results, 4, parse_band("0.25,0.75"))
    assert [(e["uid"], e["pass_rate"]) for e in kept] == [("u1", 0.25), ("u2", 0.5), ("u3", 0.75)]
    assert {e["uid"]: e["reason"] for e in gone} == {"u0": "too_hard", "u4": "too_easy"}
    assert stats["too_easy"] == stats["too_hard"] == 1
    # nothing is drawn twice: a rerun reads every sample from disk
    again = ScriptedModel()
    assert draw_and_grade(pool, again, tmp_path, samples=4, temperature=0.7, max_tokens=8, seed=0, batch_size=3,
                          settings=settings) == results and again.requests == []
    with pytest.raises(ValueError, match="other settings"):
        draw_and_grade(pool, again, tmp_path, samples=4, temperature=0.7, max_tokens=8, seed=0, batch_size=3,
                       settings={"model": "another"})


@pytest.mark.parametrize("text", ["0.5", "0.6,0.4", "a,b", "-0.1,0.5", "0.2,1.5"])
def test_bad_bands_are_refused(text):
    with pytest.raises(ValueError, match="--band"):
        parse_band(text)


# ------------------------------------------------------------------------------------------
# score: LIMO's four traits on chains whose counts are known


def test_traits_count_words_and_keyword_families_per_word():
    chain = ("Perhaps we should check the sum. Since 2 + 2 = 4, therefore the total might be 4. "
             "Let me verify: 4 is right, so the answer is \\boxed{4}.")
    raw = traits(chain)
    words = len(chain.split())
    assert raw["elaborated"] == words
    assert raw["self_verification"] == pytest.approx(2 / words)     # check, verify
    assert raw["exploratory"] == pytest.approx(2 / words)           # perhaps, might
    assert raw["granularity"] == pytest.approx(3 / words)           # since, therefore, so
    assert traits("") == {"elaborated": 0.0, "self_verification": 0.0, "exploratory": 0.0, "granularity": 0.0}


def test_the_default_weights_are_limos_and_others_can_be_given():
    assert DEFAULT_WEIGHTS == {"elaborated": 0.30, "self_verification": 0.20, "exploratory": 0.25, "granularity": 0.25}
    assert parse_weights("1,0,0,0") == {"elaborated": 1.0, "self_verification": 0.0, "exploratory": 0.0, "granularity": 0.0}
    for bad in ("1,2,3", "0,0,0,0", "-1,1,1,1", "a,b,c,d"):
        with pytest.raises(ValueError, match="--weights"):
            parse_weights(bad)


def test_percentiles_share_ties():
    assert percentiles([3.0, 1.0, 2.0, 2.0]) == [1.0, 0.0, 0.5, 0.5]
    assert percentiles([7.0]) == [0.5]


def test_scores_follow_the_traits_drop_wrong_answers_and_are_deterministic():
    rich = ("Perhaps the answer is 12, but let me check. Since 3 * 4 = 12, therefore it might hold; "
            "verify again: yes. So the answer is \\boxed{12}.")
    plain = "3 * 4 = 12. \\boxed{12}"
    pool = [_env("rich", chain=rich, answer="12"), _env("plain", chain=plain, answer="12"),
            _env("wrong", chain="\\boxed{13}", answer="12"), _env("none", chain="no box here", answer="12"),
            _env("frac", chain=r"\boxed{\frac{1}{2}}", answer="0.5")]
    kept, gone, stats = score_chains(pool)
    scores = {e["uid"]: e["score"] for e in kept}
    assert set(scores) == {"rich", "plain", "frac"} and scores["rich"] > scores["plain"]
    assert {e["uid"]: (e["reason"], e["extracted"]) for e in gone} == {"wrong": ("wrong_answer", "13"), "none": ("wrong_answer", None)}
    assert scores["rich"] == pytest.approx(1.0)  # the top of every trait
    shuffled = pool[:]
    random.Random(1).shuffle(shuffled)
    assert {e["uid"]: e["score"] for e in score_chains(shuffled)[0]} == scores
    only_length = score_chains(pool, parse_weights("1,0,0,0"))[0]
    assert [e["uid"] for e in sorted(only_length, key=lambda e: -e["score"])] == ["rich", "plain", "frac"]


# ------------------------------------------------------------------------------------------
# select: top N by score, at most per_cluster per family and a share per source


def test_select_takes_the_best_within_the_caps():
    variant = "Let $ABC$ be a triangle with sides 13, 14 and 15. Find the radius of its incircle, in simplest form."
    pool = [_env("a", question=variant, source="s1"),
            _env("b", question=variant.replace("13, 14 and 15", "5, 12 and 13"), source="s1"),   # same family as a
            _env("c", question="How many primes are below 100?", source="s1"),
            _env("d", question="Compute the sum of the first 50 odd numbers.", source="s2"),
            _env("e", question="What is the largest prime factor of 999?", source="s1")]
    for e, s in zip(pool, (0.9, 0.95, 0.8, 0.1, 0.7)):
        e["score"] = s
    kept, gone, stats = select_top(pool, n=3, per_cluster=1, per_source=0.6)
    assert [e["uid"] for e in kept] == ["b", "c", "d"]  # a: b's family is full; e: s1 has its ceil(0.6 * 3) = 2
    assert [e["rank"] for e in kept] == [1, 2, 3]
    assert {e["uid"]: e["reason"] for e in gone} == {"a": "not_selected", "e": "not_selected"}
    assert kept[0]["family"] == "a" and stats["by_source"] == {"s1": 2, "s2": 1}
    assert [e["uid"] for e in select_top(pool, n=3, per_cluster=2, per_source=1.0)[0]] == ["b", "a", "c"]
