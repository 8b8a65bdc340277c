"""The embedded demo: a byte-level chat tokenizer and verifiable step-by-step arithmetic problems.

The demo fine-tunes the ~0.8M-parameter `tiny` model for a few minutes on CPU, so its problems
are short (about 150-300 tokens with the chat template), regular and checkable line by line:
column addition with explicit carries, column subtraction with explicit borrows, and a number
times one digit with explicit carries. Each is a record in LIMO's schema (question, solution
ending in \\boxed{answer}, answer). Problems come from one seeded stream of distinct problems
(a + b and b + a count as one); the first `heldout` of them are the evaluation split and the
rest the training split, so the two never overlap and the held-out set does not change with the
number of training samples.

    python -m limo.data.synthetic --out DIR   writes DIR/train.jsonl, DIR/heldout.jsonl, DIR/tokenizer/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
DEFAULT_SYSTEM_PROMPT = "Solve step by step. Put the answer in \\boxed{}."

# Qwen2.5's turn layout (<|im_start|>role\n...<|im_end|>\n, a default system turn) with a
# shorter default system prompt: the demo's samples are a few hundred tokens.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT.replace("\\", "\\\\") + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE vocabularies.

    Bytes that are printable and not whitespace stand for themselves; the others are shifted
    to code points from 256 up, so every byte has a visible single-character symbol.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer():
    """A transformers fast tokenizer: id b < 256 is byte b, then the chat special tokens.

    Its 260 ids fit the `tiny` preset's vocab_size=320. eos is <|im_end|> (the end of a chat
    turn), pad is <|pad|>. `save_pretrained` writes it beside an HF model export and
    `AutoTokenizer.from_pretrained` reads it back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE, model_max_length=32768
    )


# ---------------------------------------------------------------------------------------------
# Problems


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, least significant first, zero-padded to `width`."""
    return [int(c) for c in str(n).zfill(width)[::-1]]


def _addition(a: int, b: int) -> tuple[str, list[str], int]:
    width = len(str(max(a, b)))
    lines, carry = ["Add the columns from right to left."], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        s = x + y + carry
        lines.append(f"{x} + {y} + {carry} = {s}: write {s % 10}, carry {s // 10}.")
        carry = s // 10
    if carry:
        lines.append(f"The last carry {carry} goes in front.")
    return f"{a} + {b}", lines, a + b


def _subtraction(a: int, b: int) -> tuple[str, list[str], int]:
    width = len(str(a))
    lines, borrow = ["Subtract the columns from right to left."], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        lend = 10 if x - y - borrow < 0 else 0
        lines.append(f"{x + lend} - {y} - {borrow} = {x + lend - y - borrow}: write {x + lend - y - borrow}, borrow {lend // 10}.")
        borrow = lend // 10
    return f"{a} - {b}", lines, a - b


def _multiplication(a: int, d: int) -> tuple[str, list[str], int]:
    lines, carry = [f"Multiply each digit by {d} from right to left."], 0
    for x in _digits(a, len(str(a))):
        s = x * d + carry
        lines.append(f"{x} * {d} + {carry} = {s}: write {s % 10}, carry {s // 10}.")
        carry = s // 10
    if carry:
        lines.append(f"The last carry {carry} goes in front.")
    return f"{a} * {d}", lines, a * d


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _draw(rng: random.Random) -> tuple[tuple, dict[str, str]]:
    """One random problem and the key that identifies it up to commutativity."""
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = _number(rng, 3), _number(rng, 3)
        key, (expr, lines, value) = ("add", min(a, b), max(a, b)), _addition(a, b)
    elif kind == "sub":
        a, b = sorted((_number(rng, 3), _number(rng, 3)), reverse=True)
        key, (expr, lines, value) = ("sub", a, b), _subtraction(a, b)
    else:
        a, d = _number(rng, 3), rng.randint(2, 9)
        key, (expr, lines, value) = ("mul", a, d), _multiplication(a, d)
    solution = "\n".join([*lines, f"So {expr} = {value}.", f"\\boxed{{{value}}}"])
    return key, {"question": f"Compute {expr}.", "solution": solution, "answer": str(value)}


def messages(record: dict[str, str]) -> list[dict[str, str]]:
    """A LIMO record as the conversation it trains: the question asked, the solution answered."""
    return [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["solution"]}]


def problems(count: int, seed: int = 0, skip: int = 0) -> list[dict[str, str]]:
    """Problems skip .. skip+count-1 of the seeded stream of distinct problems."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < skip + count:
        key, record = _draw(rng)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out[skip:]


def train_split(count: int = 817, seed: int = 0, heldout: int = 200) -> list[dict[str, str]]:
    """The training records: the stream after the held-out problems."""
    return problems(count, seed, skip=heldout)


def heldout_split(count: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """The evaluation records: the start of the stream, never in any training split of the same seed."""
    return problems(count, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m limo.data.synthetic", description="Write the demo dataset and its tokenizer.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=817, help="training problems")
    parser.add_argument("--heldout", type=int, default=200, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train_split(args.train, args.seed, args.heldout)), ("heldout", heldout_split(args.heldout, args.seed))):
        with (out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    byte_tokenizer().save_pretrained(str(out / "tokenizer"))
    print(f"wrote {out}/train.jsonl ({args.train}), {out}/heldout.jsonl ({args.heldout}), {out}/tokenizer")


if __name__ == "__main__":
    main()
