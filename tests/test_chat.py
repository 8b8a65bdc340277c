"""Chat rendering and loss masks with the real Qwen2.5 tokenizer on real problems."""

import json

import pytest

from limo.data.chat import IGNORE, encode
from limo.data.sources import DataError, Sample
from limo.data.synthetic import byte_tokenizer
from tests.conftest import shared_path

LIMO_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def qwen():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("data", "tokenizers", "qwen2.5")))


@pytest.fixture(scope="module")
def problems():
    with shared_path("data", "eval", "math", "test.jsonl").open() as f:
        rows = [json.loads(line) for line in f]
    return rows[::10]  # 50 problems spread over all subjects and levels


def conversation(row):
    return [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}]


@pytest.mark.parametrize("system", [None, LIMO_SYSTEM], ids=["template-default", "limo-system"])
def test_ids_are_the_templates_own_tokenization(qwen, problems, system):
    for row in problems:
        messages = conversation(row)
        ids, labels = encode(Sample(messages, "math"), qwen, system)
        full = messages if system is None else [{"role": "system", "content": system}, *messages]
        text = qwen.apply_chat_template(full, tokenize=False)
        assert ids == qwen(text)["input_ids"]
        assert len(labels) == len(ids)
        default = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        assert text.startswith(default if system is None else f"<|im_start|>system\n{system}<|im_end|>\n")


def test_labels_are_exactly_the_reply_and_its_im_end(qwen, problems):
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    for row in problems:
        ids, labels = encode(conversation(row), qwen, LIMO_SYSTEM)
        supervised = [t for t, label in enumerate(labels) if label != IGNORE]
        first, last = supervised[0], supervised[-1]
        assert supervised == list(range(first, last + 1))  # one contiguous span
        assert all(labels[t] == ids[t] for t in supervised)
        assert qwen.decode(ids[first : last + 1]) == row["solution"] + "<|im_end|>"
        assert ids[last] == im_end and last == len(ids) - 2  # only the template's trailing "\n" follows
        assert qwen.decode(ids[:first]).endswith(row["problem"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_every_assistant_turn_is_supervised_and_nothing_else(qwen):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 * 3?"},
        {"role": "assistant", "content": "It is 9.\n\\boxed{9}"},
    ]
    ids, labels = encode(messages, qwen, system_prompt="ignored: the conversation has its own")
    assert ids == qwen(qwen.apply_chat_template(messages, tokenize=False))["input_ids"]
    spans, run = [], []
    for t, label in enumerate(labels):
        if label != IGNORE:
            run.append(t)
        elif run:
            spans.append(qwen.decode([ids[i] for i in run]))
            run = []
    assert spans == ["4<|im_end|>", "It is 9.\n\\boxed{9}<|im_end|>"]


def test_control_tokens_in_content_are_rejected(qwen):
    injected = Sample([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|im_end|> more"}], "limo.jsonl:7")
    with pytest.raises(DataError, match=r"limo.jsonl:7: messages\[1\] \(assistant\) contains the control token '<\|im_end\|>'"):
        encode(injected, qwen)


def test_template_that_rewrites_earlier_turns_is_an_error():
    tok = byte_tokenizer()
    # numbers each render by its length: every prefix render differs from the whole conversation's start
    tok.chat_template = "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    with pytest.raises(DataError, match="x.jsonl:1: the chat template does not render turn 1 as a prefix"):
        encode(Sample([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x.jsonl:1"), tok)


def test_template_without_a_closing_special_token_is_an_error():
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="x.jsonl:2: the chat template closes an assistant turn without a special token"):
        encode(Sample([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x.jsonl:2"), tok)


def test_byte_tokenizer_labels_on_unicode_text():
    tok = byte_tokenizer()
    reply = "Größe: 3 ✓ \\boxed{3}"
    messages = [{"role": "user", "content": "Wie groß? 😀"}, {"role": "assistant", "content": reply}]
    ids, labels = encode(messages, tok)
    assert ids == tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"]
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert supervised == list(reply.encode()) + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_encode_takes_a_record_of_every_layout_as_a_plain_dict(qwen):
    """The LIMO record the README and the loader talk about, alpaca and `messages`, as plain dicts:
    the same tokens as the Sample each becomes; anything else names the keys it expected."""
    limo = {"question": "Compute 1 + 2.", "solution": "1 + 2 = 3, so \\boxed{3}.", "answer": "3", "id": 7}
    alpaca = {"instruction": "Compute 1 + 2.", "input": "", "output": "1 + 2 = 3, so \\boxed{3}."}
    chat = {"messages": [{"role": "user", "content": "Compute 1 + 2."}, {"role": "assistant", "content": "1 + 2 = 3, so \\boxed{3}."}]}
    want = encode(Sample(chat["messages"], "x"), qwen, LIMO_SYSTEM)
    for record in (limo, alpaca, chat):
        assert encode(record, qwen, LIMO_SYSTEM) == want
    with pytest.raises(DataError, match=r"cannot tell the record layout from \['prompt', 'response'\]; expected limo \(question, "
                                        r"solution, answer\)"):
        encode({"prompt": "a", "response": "b"}, qwen)
    with pytest.raises(DataError, match="field 'solution' is missing"):
        encode({"question": "a", "answer": "b"}, qwen)
    with pytest.raises(DataError, match="expected a Sample, a list of chat messages or a record dict"):
        encode("Compute 1 + 2.", qwen)
