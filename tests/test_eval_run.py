"""eval.run: the harness around a generator (a scripted fake here), resume, the summary, the
sampler adapter, and the command line end to end on a tiny model with transformers."""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from limo.data.chat import encode
from limo.data.suites import Benchmark, Problem, records_benchmark
from limo.eval.generators import Completion, LLMGenerator, Request
from limo.eval.grading import pass_at_k
from limo.eval.results import load_results
from limo.eval.run import LIMO_SYSTEM_PROMPT, evaluate, main, sample_seed
from tests.conftest import ROOT, made_once, shared_path

# Which samples the fake model gets right: problem id -> sample indices.
RIGHT = {"p0": {0, 1, 2, 3}, "p1": {1, 3}, "p2": set()}


def _bench() -> Benchmark:
    return Benchmark("toy", (Problem("p0", "2+2?", ("4",)), Problem("p1", "half of 1?", ("\\frac{1}{2}",)),
                             Problem("p2", "pick", ("B",))), samples=4, temperature=0.7)


class FakeGenerator:
    """Answers from the seed: it recovers (problem, sample) by matching each request's seed."""

    def __init__(self, bench: Benchmark, fail_after: int | None = None):
        self.keys = {sample_seed(0, bench.name, p.id, j): (p, j) for p in bench.problems for j in range(bench.samples)}
        self.requests: list[Request] = []
        self.fail_after = fail_after

    def __call__(self, requests):
        if self.fail_after is not None and len(self.requests) >= self.fail_after:
            raise RuntimeError("the machine went away")
        self.requests += requests
        out = []
        for r in requests:
            problem, j = self.keys[r.seed]
            answer = {"p0": "4", "p1": "0.5", "p2": "(B)"}[problem.id] if j in RIGHT[problem.id] else "7"
            text = f"thinking... \\boxed{{{answer}}}" if j != 2 or problem.id != "p1" else "ran out of tokens"
            out.append(Completion(text, "stop" if "boxed" in text else "length", 10 + j))
        return out


def test_evaluate_writes_samples_and_a_summary(tmp_path):
    bench = _bench()
    gen = FakeGenerator(bench)
    (summary,) = evaluate(gen, [bench], tmp_path, max_tokens=99, batch_size=5, verbose=False)

    assert {(r.user, r.system, r.temperature, r.max_tokens) for r in gen.requests} == \
        {(p.question, LIMO_SYSTEM_PROMPT, 0.7, 99) for p in bench.problems}
    assert len(gen.requests) == 12 and len({r.seed for r in gen.requests}) == 12

    results = load_results(tmp_path / "toy.jsonl")
    assert {k: r.correct for k, r in results.items()} == {(p, j): j in RIGHT[p] for p in RIGHT for j in range(4)}
    assert results[("p1", 2)].extracted is None and results[("p1", 1)].extracted == "0.5"

    c = [len(RIGHT[p]) for p in ("p0", "p1", "p2")]
    runs = [100 * sum(j in RIGHT[p] for p in RIGHT) / 3 for j in range(4)]
    assert summary["pass@1"] == pytest.approx(100 * sum(x / 4 for x in c) / 3)
    assert summary["pass@1_std"] == pytest.approx(statistics.stdev(runs))
    assert (summary["pass@1_min"], summary["pass@1_max"]) == (min(runs), max(runs))
    for k in (1, 2, 4):
        assert summary["pass@k"][str(k)] == pytest.approx(100 * sum(pass_at_k(4, x, k) for x in c) / 3)
    assert summary["no_answer_%"] == pytest.approx(100 / 12)
    assert summary["truncated_%"] == pytest.approx(100 / 12)
    assert summary["mean_tokens"] == pytest.approx(11.5)
    assert json.loads((tmp_path / "summary.json").read_text()) == [summary]


def test_resumed_equals_uninterrupted(tmp_path):
    bench = _bench()
    whole = tmp_path / "whole"
    evaluate(FakeGenerator(bench), [bench], whole, batch_size=5, verbose=False)

    parts = tmp_path / "parts"
    with pytest.raises(RuntimeError, match="went away"):
        evaluate(FakeGenerator(bench, fail_after=5), [bench], parts, batch_size=5, verbose=False)
    assert len(load_results(parts / "toy.jsonl")) == 5
    with open(parts / "toy.jsonl", "a") as f:
        f.write('{"benchmark": "toy", "problem_id": "p1", "sam')  # a write torn by the crash
    second = FakeGenerator(bench)
    evaluate(second, [bench], parts, batch_size=5, verbose=False)
    assert len(second.requests) == 7  # only what was missing

    def lines(path):
        return sorted((path / "toy.jsonl").read_text().splitlines())

    assert lines(parts) == lines(whole)
    assert json.loads((parts / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    third = FakeGenerator(bench)
    evaluate(third, [bench], parts, verbose=False)
    assert third.requests == []


def test_a_resumed_run_must_sample_the_same_way(tmp_path):
    bench = _bench()
    evaluate(FakeGenerator(bench), [bench], tmp_path, max_tokens=64, verbose=False)
    with pytest.raises(ValueError, match="max_tokens=128 .* made with 64"):
        evaluate(FakeGenerator(bench), [bench], tmp_path, max_tokens=128, verbose=False)
    with pytest.raises(ValueError, match="benchmark toy now has"):
        evaluate(FakeGenerator(bench), [bench], tmp_path, max_tokens=64, temperature=0.0, verbose=False)


def test_results_of_another_model_are_not_resumed(tmp_path):
    bench = _bench()
    evaluate(FakeGenerator(bench), [bench], tmp_path, verbose=False, model="aaaa")
    with pytest.raises(ValueError, match="come from another model \\(fingerprint aaaa, this one bbbb\\); use another --out"):
        evaluate(FakeGenerator(bench), [bench], tmp_path, verbose=False, model="bbbb")


def test_model_fingerprint_follows_the_weights_not_the_writes(tmp_path):
    import torch
    from safetensors.torch import save_file

    from limo.model.fingerprint import model_fingerprint

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    weights = {"w": torch.arange(300_000, dtype=torch.float32)}
    save_file(weights, folder / "model.safetensors")
    first = model_fingerprint(folder)
    save_file(weights, folder / "model.safetensors")  # the same weights exported again
    assert model_fingerprint(folder) == first
    save_file({"w": weights["w"] + 1}, folder / "model.safetensors")  # trained further
    assert model_fingerprint(folder) != first


def test_a_grader_failure_costs_one_verdict_not_the_batch(tmp_path, monkeypatch):
    import limo.eval.grading as grading

    real = grading.is_equivalent

    def flaky(pred, gold, **kw):
        if pred == "0.5":
            raise RecursionError("a grader bug")
        return real(pred, gold, **kw)

    monkeypatch.setattr(grading, "is_equivalent", flaky)
    bench = _bench()
    evaluate(FakeGenerator(bench), [bench], tmp_path, batch_size=12, verbose=False)
    results = load_results(tmp_path / "toy.jsonl")
    assert len(results) == 12  # the whole batch is on disk
    assert [r.correct for (p, j), r in sorted(results.items()) if p == "p1"] == [False] * 4
    assert results[("p0", 0)].correct


def test_summaries_of_earlier_benchmarks_in_the_folder_stay(tmp_path):
    bench = _bench()
    other = Benchmark("toy2", bench.problems, samples=4, temperature=0.7)
    evaluate(FakeGenerator(bench), [bench], tmp_path, verbose=False)
    evaluate(FakeGenerator(other), [other], tmp_path, verbose=False)
    assert [s["benchmark"] for s in json.loads((tmp_path / "summary.json").read_text())] == ["toy", "toy2"]


def test_context_len_stays_within_the_trained_positions(tmp_path):
    from limo.eval.run import context_len

    (tmp_path / "config.json").write_text('{"max_position_embeddings": 32768}')
    assert context_len(tmp_path, 32768) == 32768 and context_len(tmp_path, 512) == 4608


def test_bad_lines_in_a_results_file_are_named(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text('{"benchmark": "toy"}\n')
    with pytest.raises(ValueError, match=r"toy\.jsonl:1: expected keys"):
        load_results(path)


def test_regrade_rewrites_verdicts(tmp_path):
    bench = _bench()
    evaluate(FakeGenerator(bench), [bench], tmp_path, verbose=False)
    harder = Benchmark("toy", (Problem("p0", "2+2?", ("5",)),) + bench.problems[1:], samples=4, temperature=0.7)
    (summary,) = evaluate(FakeGenerator(harder), [harder], tmp_path, regrade=True, verbose=False)
    assert not any(r.correct for (p, _), r in load_results(tmp_path / "toy.jsonl").items() if p == "p0")
    assert summary["pass@1"] == pytest.approx(100 * (2 / 4) / 3)


def test_synthetic_records_go_through_the_same_path(tmp_path):
    bench = records_benchmark("synthetic", [{"question": "3*3?", "solution": "...", "answer": "9"}])

    def generator(requests):
        return [Completion("\\boxed{9}", "stop", 3) for _ in requests]

    (summary,) = evaluate(generator, [bench], tmp_path, verbose=False)
    assert summary["pass@1"] == 100.0


# ------------------------------------------------------------------------------------------
# The adapter over eval.sampler.LLM, with a fake LLM of the announced interface.


@dataclass
class _Params:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    n: int


@dataclass
class _Output:
    prompt_index: int
    sample_index: int
    token_ids: list
    text: str
    finish_reason: str


class _FakeLLM:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outs = [_Output(i, 0, [1, 2, 3], f"answer {i}", "stop") for i in range(len(prompts))]
        return outs[::-1]  # any order: the adapter sorts by (prompt, sample)


def test_llm_adapter_templates_prompts_and_orders_outputs():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared_path("data", "tokenizers", "qwen2.5")))
    llm = _FakeLLM(tokenizer)
    requests = [Request(LIMO_SYSTEM_PROMPT, f"question {i}", 0.7, 0.95, 100, 1000 + i) for i in range(3)]
    completions = LLMGenerator(llm, sampling_params=_Params, use_tqdm=False)(requests)
    assert completions == [Completion(f"answer {i}", "stop", 3) for i in range(3)]
    prompts, params = llm.calls[0]
    assert params == [_Params(0.7, 0.95, 100, 1000 + i, 1) for i in range(3)]
    text = tokenizer.decode(prompts[1])
    assert text == ("<|im_start|>system\n" + LIMO_SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\nquestion 1<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # The sampler's prompt is the prefix training sees of the same conversation with its reply.
    trained, _ = encode([{"role": "user", "content": "question 1"}, {"role": "assistant", "content": "answer 1"}], tokenizer,
                        system_prompt=LIMO_SYSTEM_PROMPT)
    assert trained[: len(prompts[1])] == prompts[1]


def test_llm_adapter_rejects_a_missing_output():
    class Short(_FakeLLM):
        def generate(self, prompts, params, use_tqdm=True):
            return super().generate(prompts, params)[1:]

    from transformers import AutoTokenizer

    llm = Short(AutoTokenizer.from_pretrained(str(shared_path("data", "tokenizers", "qwen2.5"))))
    with pytest.raises(RuntimeError, match="expected exactly one for each of 2"):
        LLMGenerator(llm, sampling_params=_Params)([Request("s", "u", 0.0, 1.0, 5, 1)] * 2)


# ------------------------------------------------------------------------------------------
# The command line, end to end: a tiny random Qwen2 folder, the bundled benchmark files.


def _tiny_qwen_folder(model_dir: Path) -> Path:
    """A random one-layer Qwen2 with the real Qwen2.5 tokenizer and vocabulary, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(shared_path("data", "tokenizers", "qwen2.5")))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return model_dir


def test_command_line_on_a_local_model_folder(tmp_path, capsys):
    model_dir = _tiny_qwen_folder(tmp_path / "tiny")

    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--benchmarks", "aime24,gpqa", "--limit", "2", "--samples", "2", "--max-tokens", "6",
            "--engine", "transformers", "--device", "cpu", "--dtype", "float32", "--out", str(out),
            "--data", str(shared_path("data", "eval"))]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "aime24" in printed and "gpqa" in printed and "pass@1" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["benchmark"], s["problems"], s["samples"]) for s in summary] == [("aime24", 2, 2), ("gpqa", 2, 2)]
    for name in ("aime24", "gpqa"):
        results = load_results(out / f"{name}.jsonl")
        assert len(results) == 4
        assert all(r.num_tokens <= 6 and r.finish_reason in ("stop", "length") for r in results.values())
    # the same command again generates nothing and reports the same summary
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "0 to generate" in capsys.readouterr().out


def test_a_folder_without_finished_samples_is_not_a_lock(tmp_path):
    """An interrupted first run leaves config.json and nothing else: a later run with other
    settings takes the folder over instead of being refused."""
    bench = _bench()
    with pytest.raises(RuntimeError, match="the machine went away"):
        evaluate(FakeGenerator(bench, fail_after=0), [bench], tmp_path, max_tokens=32768, verbose=False)
    assert (tmp_path / "config.json").is_file() and not any(f.stat().st_size for f in tmp_path.glob("*.jsonl"))
    evaluate(FakeGenerator(bench), [bench], tmp_path, max_tokens=512, verbose=False)
    assert json.loads((tmp_path / "config.json").read_text())["max_tokens"] == 512
    with pytest.raises(ValueError, match="max_tokens=64 .* made with 512"):  # now it holds results: they are kept consistent
        evaluate(FakeGenerator(bench), [bench], tmp_path, max_tokens=64, verbose=False)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent"], "--model /nonexistent: no such model folder"),
    (["--benchmarks", "aime25"], "unknown benchmark 'aime25'; known: aime24"),
    (["--device", "cuda"], "--device cuda, but no CUDA device is visible"),
])
def test_command_line_mistakes_are_one_line(tmp_path, capsys, argv, message):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is no mistake here")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    base = {"--model": str(model), "--benchmarks": "aime24"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert main([x for kv in base.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_cpu_kv_cache_has_an_explicit_budget_and_costs_only_what_it_uses(tmp_path):
    """On a CPU the cache is sized from kv_cache_gib (default 4 GiB, as vLLM's CPU backend), never
    from the RAM that happens to be free, and it is not touched until used."""
    import torch

    from limo.eval.sampler import LLM
    from limo.eval.sampler.runner import CPU_KV_CACHE_GIB
    from limo.model.init import init_weights
    from limo.model.qwen2 import PRESETS, build_model
    from limo.model.weights import save_pretrained

    torch.manual_seed(0)
    model = build_model(PRESETS["tiny"], device="cpu")
    init_weights(model)
    save_pretrained(model, tmp_path / "tiny", dtype=torch.float32)
    args = PRESETS["tiny"]
    page = 2 * args.num_layers * 16 * args.num_kv_heads * args.head_dim * 4
    big = LLM(tmp_path / "tiny", device="cpu", max_model_len=32768, max_num_seqs=256)
    assert big.runner.num_blocks == int(CPU_KV_CACHE_GIB * 2**30 // page)  # the budget, not the free RAM
    small = LLM(tmp_path / "tiny", device="cpu", max_model_len=32768, kv_cache_gib=0.01)
    assert small.runner.num_blocks == int(0.01 * 2**30 // page)
    with pytest.raises(ValueError, match="kv_cache_gib=0 must be > 0"):
        LLM(tmp_path / "tiny", device="cpu", kv_cache_gib=0)


@pytest.fixture(scope="module")
def tiny_folder_and_reference(tmp_path_factory):
    """A tiny random Qwen2 with the real tokenizer, and its uninterrupted evaluation (`command`)."""
    def command(model_dir: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "limo.eval.run", "--model", str(model_dir), "--benchmarks", "math500", "--limit", "12",
                "--samples", "2", "--temperature", "0.7", "--max-tokens", "40", "--max-num-seqs", "2", "--device", "cpu",
                "--out", str(out), "--data", str(shared_path("data", "eval"))]  # fmt: skip

    def make(root: Path) -> None:
        model_dir = _tiny_qwen_folder(root / "tiny")
        subprocess.run(command(model_dir, root / "reference"), cwd=ROOT, env=_SAMPLER_ENV, check=True, capture_output=True, timeout=600)

    root = made_once(tmp_path_factory, "eval-signal", make)
    return functools.partial(command, root / "tiny"), root / "reference"


_SAMPLER_ENV = {**os.environ, "KERNELS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_batch_keeps_every_finished_sample_and_the_rerun_equals_an_uninterrupted_run(
        tmp_path, signum, tiny_folder_and_reference):
    """One batch of 24 samples, decoded 2 at a time: the signal lands mid-batch, after some have
    finished. Every finished one is on disk, the exit code says which signal, and the same
    command then completes the run with the results of a run never interrupted."""
    command, reference = tiny_folder_and_reference
    out = tmp_path / "out"
    proc = subprocess.Popen(command(out), cwd=ROOT, env=_SAMPLER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "math500.jsonl"
    deadline = time.monotonic() + 300
    while not (results.exists() and results.read_bytes().count(b"\n") >= 2) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    seen = results.read_bytes().count(b"\n")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err, err[-3000:]
    kept = load_results(results)
    assert 2 <= seen <= len(kept) < 24  # nothing written was lost, and the batch was cut short
    subprocess.run(command(out), cwd=ROOT, env=_SAMPLER_ENV, check=True, capture_output=True, timeout=600)
    assert load_results(results) == load_results(reference / "math500.jsonl")
    assert json.loads((out / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
