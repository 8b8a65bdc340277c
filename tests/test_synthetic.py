"""The demo's byte-level tokenizer and its verifiable step-by-step problems."""

import json
import re

import pytest

from limo.data import synthetic
from limo.data.chat import encode
from limo.data.sources import load_records
from limo.model.qwen2 import PRESETS

QUESTION = re.compile(r"^Compute (\d+) ([-+*]) (\d+)\.$")
ADD_OR_MUL = re.compile(r"^(\d+) ([+*]) (\d+) \+ (\d+) = (\d+): write (\d), carry (\d+)\.$")
SUB = re.compile(r"^(\d+) - (\d) - ([01]) = (\d): write (\d), borrow ([01])\.$")


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.byte_tokenizer()


def test_byte_ids_are_the_bytes_and_fit_the_tiny_vocab(tokenizer):
    text = "x = 3, y ≠ 4 — 😀\t\n\\boxed{7}"
    assert tokenizer(text)["input_ids"] == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text
    assert [tokenizer.convert_tokens_to_ids(t) for t in synthetic.SPECIAL_TOKENS] == [256, 257, 258, 259]
    assert len(tokenizer) == 260 <= PRESETS["tiny"].vocab_size
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|pad|>")
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids == [257, *b"user\nhi", 258]


def test_chat_template_is_qwen_style(tokenizer):
    messages = [{"role": "user", "content": "Compute 2 + 2."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\n{synthetic.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nCompute 2 + 2.<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "S"}, *messages, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nCompute 2 + 2.<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_save_and_load_with_auto_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Compute 9 * 9. ü"}, {"role": "assistant", "content": "\\boxed{81}"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert encode(messages, loaded) == encode(messages, tokenizer)
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (258, 259, 260)


def _check_steps(question: str, solution: str, answer: str) -> None:
    """Recompute every line of a solution from the question alone."""
    a, op, b = QUESTION.match(question).groups()
    a, b = int(a), int(b)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    lines = solution.split("\n")
    assert lines[-2:] == [f"So {a} {op} {b} = {value}.", f"\\boxed{{{value}}}"] and answer == str(value)
    width = len(str(max(a, b))) if op != "*" else len(str(a))
    top, bottom = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, written, carry = lines[1 : 1 + width], [], 0
    for i, line in enumerate(steps):
        if op == "-":
            x, y, r, d, w, borrow = map(int, SUB.match(line).groups())
            assert (x % 10, y, r) == (int(top[i]), int(bottom[i]), carry) and x - y - r == d == w >= 0
            assert borrow == (x >= 10)
            carry = borrow
        else:
            x, o, y, c, s, w, k = ADD_OR_MUL.match(line).groups()
            x, y, c, s, w, k = map(int, (x, y, c, s, w, k))
            assert (x, c) == (int(top[i]), carry) and (y == int(bottom[i]) if op == "+" else y == b)
            assert s == (x + y + c if o == "+" else x * y + c) and (w, k) == (s % 10, s // 10)
            carry = k
        written.append(str(w))
    assert carry == 0 or lines[1 + width] == f"The last carry {carry} goes in front."
    assert int(("" if carry == 0 else str(carry)) + "".join(reversed(written))) == value


def test_every_step_of_every_problem_checks_out():
    records = synthetic.train_split() + synthetic.heldout_split()
    assert len(records) == 817 + 200
    for r in records:
        _check_steps(r["question"], r["solution"], r["answer"])
    kinds = {QUESTION.match(r["question"]).group(2) for r in records}
    assert kinds == {"+", "-", "*"}


def _key(record):
    a, op, b = QUESTION.match(record["question"]).groups()
    return (op, *sorted((int(a), int(b)))) if op == "+" else (op, int(a), int(b))


def test_deterministic_distinct_and_heldout_disjoint():
    train, heldout = synthetic.train_split(), synthetic.heldout_split()
    assert train == synthetic.train_split() and heldout == synthetic.heldout_split()
    assert synthetic.train_split(seed=1) != train
    keys = [_key(r) for r in train + heldout]
    assert len(set(keys)) == len(keys)  # distinct within and across splits, up to a + b = b + a
    assert synthetic.heldout_split() == synthetic.heldout_split(count=200)
    assert synthetic.train_split(count=100) == train[:100]  # the held-out split never depends on the training size


def test_lengths_suit_the_tiny_demo(tokenizer):
    lengths = [len(encode(synthetic.messages(r), tokenizer)[0]) for r in synthetic.train_split()]
    assert 100 <= min(lengths) and max(lengths) <= 320, (min(lengths), max(lengths))


def test_cli_writes_limo_jsonl_and_a_loadable_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    synthetic.main(["--out", str(tmp_path), "--train", "30", "--heldout", "10"])
    samples, report = load_records(str(tmp_path / "train.jsonl"))
    assert (report.records, report.format) == (30, "limo")
    assert [s.messages[0]["content"] for s in samples] == [r["question"] for r in synthetic.train_split(30, heldout=10)]
    heldout = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert heldout == synthetic.heldout_split(10)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer")).eos_token == "<|im_end|>"
    assert "train.jsonl (30)" in capsys.readouterr().out
