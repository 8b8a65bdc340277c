"""python -m limo.curate end to end: the output contract, resume and rerun, and the difficulty step
on the demo's tiny model through our sampler, killed mid-way and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from limo.curate.__main__ import main
from limo.data.sources import load_records
from tests.conftest import ROOT, shared_path

RICH = ("Perhaps we can factor it. Let me check: since {a} + {b} = {c}, therefore the sum is {c}; "
        "verify once more, it might hold. So \\boxed{{{c}}}.")


def _math500(n: int) -> list[dict]:
    with open(shared_path("data", "eval", "math", "test.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


@pytest.fixture()
def pool(tmp_path) -> list[Path]:
    limo = [{"id": f"L{i}", "question": f"Compute {10 + i} + {20 + 3 * i}, showing each step.", "solution": RICH.format(
             a=10 + i, b=20 + 3 * i, c=30 + 4 * i), "answer": str(30 + 4 * i), "source": "limo-like"} for i in range(6)]
    limo.append({**limo[0], "id": "L0-copy", "question": "  Problem 4.  " + limo[0]["question"]})      # a duplicate
    limo.append({"id": "L-wrong", "question": "Compute 7 * 8.", "solution": "So \\boxed{54}.", "answer": "56"})
    hidden = _math500(2)
    limo += [{"id": f"M{i}", "question": "Problem 7. " + r["problem"].replace("$", " $ "), "solution": r["solution"],
              "answer": r["answer"]} for i, r in enumerate(hidden)]                                    # contaminated
    messages = [{"id": "C1", "messages": [{"role": "user", "content": "How many primes are below 30?"},
                                          {"role": "assistant", "content": "2, 3, 5, 7, 11, 13, 17, 19, 23, 29: so \\boxed{10}."}],
                 "answer": "10"}]
    alpaca = [{"id": "A1", "instruction": "Evaluate 2^10.", "input": "", "output": "Since 2^10 = 1024, \\boxed{1024}."}]
    files = []
    for name, rows in (("limo.jsonl", limo), ("chat.jsonl", messages), ("alpaca.jsonl", alpaca)):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files.append(path)
    return files


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_output_contract(pool, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--pool", *map(str, pool), "--out", str(out), "--select", "5", "--eval-dir", str(shared_path("data", "eval"))]
    assert main(argv) == 0
    kept, removed = _rows(out / "kept.jsonl"), _rows(out / "removed.jsonl")
    originals = {r["id"]: r for path in pool for r in _rows(path)}

    assert len(kept) == 5 and len(kept) + len(removed) == len(originals)
    for row in kept:  # LIMO's layout; a LIMO record exactly as it came, others keep their own fields
        src = originals[row["id"]]
        assert row == src if "question" in src else ({k: row[k] for k in src if k in row} == {k: src[k] for k in src if k in row})
        assert {"question", "solution", "answer"} <= set(row)
    samples, _ = load_records(str(out / "kept.jsonl"))   # limo/engine/train.py's reader takes it as it is
    assert len(samples) == 5
    chat = next((r for r in kept if r["id"] == "C1"), None) or next(r for r in removed if r["id"] == "C1")
    assert chat.get("reason") or (chat["question"] == "How many primes are below 30?" and chat["answer"] == "10")

    reasons = {r["id"]: r["reason"] for r in removed}
    assert reasons["L0-copy"] == "duplicate" and reasons["L-wrong"] == "wrong_answer"
    assert reasons["M0"] == reasons["M1"] == "contaminated"
    assert all(r["benchmark"] == "math" for r in removed if r["reason"] == "contaminated")
    assert all(set(r) - {"reason", "benchmark", "curation"} == set(originals[r["id"]]) for r in removed)
    assert all(r[k] == originals[r["id"]][k] for r in removed for k in originals[r["id"]])
    assert list(reasons.values()).count("not_selected") == len(originals) - 5 - 4

    report = (out / "report.md").read_text()
    assert "| contaminated | 2 |" in report and "| math | 2 |" in report
    for figure in ("lengths", "scores", "removals"):
        assert (out / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    # The same command again reuses every step; new select settings redo select alone.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done earlier") == 4
    assert main([*argv[:-4], "--select", "2", *argv[-2:]]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 3 and "select: {" in printed
    assert len(_rows(out / "kept.jsonl")) == 2
    # Leaving a step out after it ran keeps using its output; changing what feeds it is an error.
    assert main([*argv, "--steps", "score,select"]) == 0
    assert "dedup: not asked for" in capsys.readouterr().out
    assert main([*argv, "--steps", "dedup", "--dup-threshold", "0.5"]) == 0   # the same records survive: still usable
    assert main([*argv, "--steps", "score,select"]) == 0
    assert main([*argv, "--steps", "dedup", "--dup-threshold", "0.2"]) == 0   # now the Compute problems merge
    assert len(_rows(out / "steps" / "dedup" / "kept.jsonl")) < 11
    assert main([*argv, "--steps", "score,select"]) == 2
    assert "another input" in capsys.readouterr().err


def test_difficulty_needs_a_model(pool, tmp_path):
    with pytest.raises(SystemExit):
        main(["--pool", str(pool[0]), "--out", str(tmp_path / "o"), "--steps", "difficulty"])


# ------------------------------------------------------------------------------------------
# The difficulty step on the demo's tiny model (random weights, byte tokenizer) with our sampler,
# killed after its first batch and run again: the result equals an uninterrupted run's.


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from limo.data.synthetic import byte_tokenizer
    from limo.model.weights import main as weights_main

    folder = tmp_path_factory.mktemp("tiny")
    assert weights_main(["--preset", "tiny", "--out", str(folder)]) == 0
    byte_tokenizer().save_pretrained(str(folder))
    return folder


def _argv(pool_file: Path, out: Path, model: Path) -> list[str]:
    return ["--pool", str(pool_file), "--out", str(out), "--model", str(model), "--steps", "dedup,difficulty", "--samples", "2",
            "--max-tokens", "12", "--batch-size", "4", "--band", "0,1", "--device", "cpu", "--max-num-seqs", "8"]


def _curate(argv: list[str], crash: bool = False) -> subprocess.CompletedProcess:
    """The command in its own process, on the torch kernels (the Triton interpreter is for numerics,
    far too slow to sample with); `crash`: SIGKILLed once its first batch is on disk."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CURATE_CRASH_AFTER_BATCHES")}
    env |= {"KERNELS_BACKEND": "torch"} | ({"CURATE_CRASH_AFTER_BATCHES": "1"} if crash else {})
    return subprocess.run([sys.executable, "-m", "limo.curate", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_difficulty_resumes_after_a_kill(tiny_model, tmp_path):
    from limo.data.synthetic import problems

    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in problems(5, seed=3)), encoding="utf-8")
    whole = _curate(_argv(pool_file, tmp_path / "whole", tiny_model))
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = _curate(_argv(pool_file, tmp_path / "resumed", tiny_model), crash=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    samples = tmp_path / "resumed" / "steps" / "difficulty" / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 4 and not (tmp_path / "resumed" / "kept.jsonl").exists()
    resumed = _curate(_argv(pool_file, tmp_path / "resumed", tiny_model))
    assert resumed.returncode == 0 and "4/10" in resumed.stderr, resumed.stderr[-2000:]  # the bar starts at the 4 on disk

    for name in ("samples.jsonl", "kept.jsonl", "removed.jsonl"):
        a = (tmp_path / "whole" / "steps" / "difficulty" / name).read_text().replace(str(tmp_path / "whole"), "")
        b = (tmp_path / "resumed" / "steps" / "difficulty" / name).read_text().replace(str(tmp_path / "resumed"), "")
        assert sorted(a.splitlines()) == sorted(b.splitlines()) and (name == "samples.jsonl" or a == b)
    rated = _rows(tmp_path / "whole" / "steps" / "difficulty" / "kept.jsonl")
    assert [e["uid"].rsplit(":", 1)[1] for e in rated] == ["1", "2", "3", "4", "5"]  # band 0,1 keeps every rated problem
    assert all(e["pass_rate"] in (0.0, 0.5, 1.0) for e in rated)


def test_the_old_name_points_to_the_command():
    proc = subprocess.run([sys.executable, "-m", "limo.data.curate", "--pool", "x.jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "curation is `python -m limo.curate` (the same options" in proc.stderr
