"""Bad input through every command line that takes it: one line naming the file, line, key or
path, printed once (rank 0), exit code 2, no traceback, and no output folder left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from limo.data import synthetic
from tests.conftest import ROOT, TORCHRUN

GOOD = {"question": "What is 2+3?", "solution": "2+3 = \\boxed{5}", "answer": "5"}

# Each bad data file as a user makes it, and the words its one line must hold.
BAD_DATA = {
    "broken-line": (json.dumps(GOOD) + "\n" + '{"question": "What is 1+1?", "solution": "unterminated', ":2: not valid JSON (Unterminated string starting at column"),
    "empty": ("", ": contains no records"),
    "no-answer": (json.dumps({"question": "q", "solution": "s"}) + "\n", ":1: field 'answer' is missing"),
    "not-utf8": (json.dumps(GOOD) + "\n", ":1: not UTF-8 (byte 0xe9"),
}  # fmt: skip


def _write_bad(folder: Path, name: str) -> Path:
    text, _ = BAD_DATA[name]
    path = folder / f"{name}.jsonl"
    data = text.encode()
    if name == "not-utf8":
        data = data.replace(b"2+3", b"2+3 \xe9", 1)
    path.write_bytes(data)
    return path


def _one_line_refusal(proc: subprocess.CompletedProcess, *words: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert all(w in errors[0] for w in words), f"{words} not all in: {errors[0]}"
    return errors[0]


def _run(args: list[str], cwd: Path = ROOT, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS_BACKEND": "torch"}
    cmd = [*(launcher or [sys.executable]), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    synthetic.byte_tokenizer().save_pretrained(str(folder))
    return folder


def _train(out: Path, *extra: str) -> list[str]:
    return ["limo/engine/train.py", "--config", "configs/demo.toml", "--data.samples_per_step=2", "--train.max_steps=1",
            "--eval.benchmarks=", f"--train.output_dir={out}", *extra]  # fmt: skip


def test_training_refuses_each_bad_data_file_in_one_line_and_leaves_no_output_dir(tmp_path, tokenizer_dir):
    cases = []
    for name in BAD_DATA:
        path = _write_bad(tmp_path, name)
        out = tmp_path / f"out-{name}"
        cases.append((name, path, out, _train(out, f"--data.path={path}", f"--data.tokenizer={tokenizer_dir}")))
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda case: _run(case[3]), cases))
    for (name, path, out, _), proc in zip(cases, procs):
        _one_line_refusal(proc, str(path), BAD_DATA[name][1])
        assert not out.exists(), f"{name}: the failed start left {out}"


def test_training_under_torchrun_says_it_once(tmp_path, tokenizer_dir):
    path = _write_bad(tmp_path, "no-answer")
    proc = _run(_train(tmp_path / "out", f"--data.path={path}", f"--data.tokenizer={tokenizer_dir}"),
                launcher=[*TORCHRUN, "--nproc_per_node", "2"])  # fmt: skip
    mine = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # torchrun's own report follows (its exit 1)
    assert proc.returncode != 0 and len(mine) == 1 and f"{path}:1: field 'answer' is missing" in mine[0], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_an_output_dir_that_cannot_be_made_is_one_line(where, tmp_path):
    (tmp_path / "file").write_text("x")
    out = Path("/proc/limo-run") if where == "proc" else tmp_path / "file" / "run"
    message = "cannot create folders in /proc" if where == "proc" else f"{tmp_path / 'file'} is a file, not a folder"
    _one_line_refusal(_run(_train(out)), f"train.output_dir='{out}'", message)


def test_a_model_folder_without_a_tokenizer_is_refused_up_front(tmp_path):
    model = tmp_path / "model"
    proc = _run(["-m", "limo.model.weights", "--preset", "tiny", "--out", str(model)])
    assert proc.returncode == 0, proc.stderr
    assert not any((model / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    words = (f"no tokenizer in {model}: looked for tokenizer.json, tokenizer_config.json, vocab.json, tokenizer.model",)
    _one_line_refusal(_run(_train(tmp_path / "out", f"--model.path={model}")), *words, "--data.tokenizer=DIR")
    assert not (tmp_path / "out").exists()
    _one_line_refusal(_run(["-m", "limo.eval.run", "--model", str(model), "--benchmarks", "synthetic", "--out", str(tmp_path / "eval")]), *words)
    assert not (tmp_path / "eval").exists()


def test_inspect_and_curate_refuse_bad_data_in_one_line(tmp_path, tokenizer_dir):
    for name in BAD_DATA:
        path = _write_bad(tmp_path, name)
        _one_line_refusal(_run(["-m", "limo.data.inspect", "--data", str(path), "--tokenizer", str(tokenizer_dir)]), str(path), BAD_DATA[name][1])
    path = _write_bad(tmp_path, "broken-line")
    _one_line_refusal(_run(["-m", "limo.curate", "--pool", str(path), "--out", str(tmp_path / "curated"), "--steps", "dedup"]),
                      str(path), ":2: not")  # fmt: skip


@pytest.mark.parametrize("module", ["limo.engine.train", "limo.engine.memory", "limo.engine.simulate"])
def test_a_misspelled_key_is_one_line_with_the_key_it_meant(module, tmp_path):
    extra = [f"--train.output_dir={tmp_path / 'out'}"] if module == "limo.engine.train" else []
    proc = _run(["-m", module, "--config", "configs/demo.toml", "--optim.lrr=1e-5", *extra])
    _one_line_refusal(proc, "unknown key 'optim.lrr' (did you mean 'optim.lr'?)")


def test_a_misspelled_key_inside_the_toml_file_gets_a_did_you_mean(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text((ROOT / "configs/demo.toml").read_text().replace("warmup_ratio", "warmup_ration", 1))
    proc = _run(["-m", "limo.engine.memory", "--config", str(recipe)])
    _one_line_refusal(proc, str(recipe), "unknown key 'optim.warmup_ration' (did you mean 'optim.warmup_ratio'?)")
