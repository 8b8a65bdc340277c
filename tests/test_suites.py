"""data.suites: LIMO's ten benchmark files, GPQA's option shuffle, other sources."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import pytest

from limo.data.suites import SUITE, RecordError, gpqa_shuffle, load_benchmark, records_benchmark
from tests.conftest import shared_path

COUNTS = {"aime24": 30, "amc23": 40, "math500": 500, "olympiadbench": 675, "gpqa": 198, "minerva": 272, "chmath": 30,
          "gaokao": 79, "kaoyan": 199, "gradeschool": 210}


@pytest.fixture(scope="module")
def data():
    return shared_path("data", "eval")


@pytest.mark.parametrize("name", list(SUITE))
def test_every_benchmark_loads(name, data):
    bench = load_benchmark(name, data)
    assert len(bench.problems) == COUNTS[name]
    assert len({p.id for p in bench.problems}) == len(bench.problems)
    assert all(p.question.strip() and p.golds and all(g.strip() for g in p.golds) for p in bench.problems)
    sampled = name in ("aime24", "amc23", "chmath")
    assert (bench.samples, bench.temperature) == ((16, 0.7) if sampled else (1, 0.0))


def test_golds_follow_each_files_keys(data):
    assert load_benchmark("amc23", data).problems[0].golds == ("27",)  # 27.0 in the file
    gaokao = {p.id: p for p in load_benchmark("gaokao", data).problems}
    assert gaokao["2"].golds == ("D", "3 \\sqrt{2}")                  # choice letter and the option's content
    assert gaokao["0"].golds == ("C", "{x \\mid-3<x<4}")              # "C. ..." prefix removed from the content
    assert gaokao["10"].golds == ("(4,0)",)                            # a free answer
    school = load_benchmark("gradeschool", data).problems
    assert school[44].golds == ("3568, 5880, 6512, 864",)              # a list of answers
    assert school[91].golds == ("42, 84",)                             # a dict of parts
    assert school[39].golds == ("10",)                                 # an int


def _gpqa_original(data) -> dict[str, str]:
    """id -> the right option's text, read straight from LIMO's file (where it is always A)."""
    right = {}
    for line in (data / "gpqa" / "test.jsonl").read_text(encoding="utf-8").strip("\n").split("\n"):  # not splitlines: U+2028 occurs
        record = json.loads(line)
        assert record["answer"] == "A"
        right[str(record["id"])] = re.search(r"\n\nA\. (.*?)\nB\. ", record["question"], re.DOTALL).group(1).strip()
    return right


def test_gpqa_options_are_shuffled_and_the_gold_follows_the_right_option(data):
    right = _gpqa_original(data)
    bench = load_benchmark("gpqa", data)
    letters = Counter()
    for p in bench.problems:
        (letter,) = p.golds
        letters[letter] += 1
        shown = re.search(rf"\n{letter}\. (.*?)(?:\n[A-D]\. |\n\nPlease reason)", p.question, re.DOTALL).group(1).strip()
        assert shown == right[p.id], p.id
        assert p.question.count("\nA. ") == 1 and p.question.endswith("with \\boxed{} in the end.")
    assert set(letters) == set("ABCD") and letters["A"] < len(bench.problems) / 2, letters
    assert load_benchmark("gpqa", data).problems == bench.problems  # the same on every load


def test_gpqa_shuffle_is_a_seeded_permutation():
    orders = [gpqa_shuffle(str(i), ["w", "x", "y", "z"]) for i in range(50)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert orders == [gpqa_shuffle(str(i), ["w", "x", "y", "z"]) for i in range(50)]
    assert len({tuple(o) for o in orders}) > 10
    assert [gpqa_shuffle(str(i), "wxyz", seed=1) for i in range(50)] != orders


def test_gpqa_in_the_original_datasets_schema(tmp_path):
    record = {"Record ID": "rec7", "Question": "Which?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
              "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"}
    path = tmp_path / "gpqa.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (problem,) = load_benchmark("gpqa", path).problems
    assert problem.id == "rec7"
    assert f"\n{problem.golds[0]}. right\n" in problem.question + "\n"
    assert problem.question.startswith("Which?\n\nA. ")


def test_bad_records_name_file_line_and_key(tmp_path):
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"id": 1, "problem": "p", "answer": "3"}) + "\n" + json.dumps({"id": 2, "problem": "q"}) + "\n")
    with pytest.raises(RecordError, match=r"aime\.jsonl:2: none of the keys \['answer'"):
        load_benchmark("aime24", path)
    path.write_text('{"id": 1, "problem": "p", "answer": "3"}\n{"id": 2, oops\n')
    with pytest.raises(RecordError, match=r"aime\.jsonl:2: not JSON"):
        load_benchmark("aime24", path)
    path.write_text(json.dumps({"id": 1, "problem": "p", "answer": "3"}) + "\n" + json.dumps({"id": 1, "problem": "q", "answer": "4"}))
    with pytest.raises(ValueError, match="problem id '1' appears more than once"):
        load_benchmark("aime24", path)
    with pytest.raises(KeyError, match="unknown benchmark 'aime25'; known: aime24, amc23"):
        load_benchmark("aime25", path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("math500", tmp_path / "nowhere")


def test_hub_source_downloads_the_named_file(tmp_path, monkeypatch):
    local = tmp_path / "test.jsonl"
    local.write_text(json.dumps({"unique_id": "u1", "problem": "1+1?", "answer": "2"}) + "\n")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(local)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    bench = load_benchmark("math500", "hf:HuggingFaceH4/MATH-500/test.jsonl@abc123")
    assert calls == [dict(repo_id="HuggingFaceH4/MATH-500", filename="test.jsonl", repo_type="dataset", revision="abc123")]
    assert [(p.id, p.question, p.golds) for p in bench.problems] == [("u1", "1+1?", ("2",))]
    with pytest.raises(ValueError, match="expected hf:owner/dataset/path"):
        load_benchmark("math500", "hf:HuggingFaceH4/MATH-500")


@dataclass
class _LimoSample:  # data.synthetic's schema
    question: str
    solution: str
    answer: str


def test_records_benchmark_takes_dicts_and_objects():
    bench = records_benchmark("synthetic", [_LimoSample("2+3?", "...", "5"), {"problem": "7*6?", "answer": 42}])
    assert [(p.id, p.question, p.golds) for p in bench.problems] == [("0", "2+3?", ("5",)), ("1", "7*6?", ("42",))]
    assert (bench.samples, bench.temperature) == (1, 0.0)
    with pytest.raises(RecordError, match="synthetic record 0: none of the keys"):
        records_benchmark("synthetic", [{"question": "no answer"}])
    with pytest.raises(ValueError, match="has no problems"):
        records_benchmark("synthetic", [])


def test_bad_gpqa_letters_and_bad_json_are_named(data, tmp_path):
    line = (data / "gpqa" / "test.jsonl").read_text(encoding="utf-8").split("\n")[0]
    for letter in ("BC", "E", "a"):
        path = tmp_path / "gpqa.jsonl"
        path.write_text(json.dumps({**json.loads(line), "answer": letter}) + "\n", encoding="utf-8")
        with pytest.raises(RecordError, match=rf"gpqa\.jsonl:1: GPQA answer '{letter}' is not one of the option letters"):
            load_benchmark("gpqa", path)
    broken = tmp_path / "aime.json"
    broken.write_text('[{"problem": "x", "answer": 1},\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"aime\.json:2: not JSON"):
        load_benchmark("aime24", broken)
