"""A conversation -> token ids and loss labels, rendered by the tokenizer's own chat template.

The ids are exactly `tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))`, so
training sees the same tokens the sampler will feed at inference. Labels copy the ids on each
assistant reply and on the special token that closes it (Qwen's `<|im_end|>`, which is what
teaches the model to stop); everything else (system and user turns, the template's role
headers, the newline after `<|im_end|>`) is -100. Labels are NOT shifted here: packing shifts
them within each sample.

Reply spans are found by rendering the conversation up to each assistant turn with and without
that turn: text the template adds for the reply starts where the generation prompt ends and
stops where the next render ends. Token offsets from the fast tokenizer map those character
spans onto tokens, so no template-specific string is hard-coded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from limo.data.sources import DataError, Sample, detect_format, to_sample


# What marks a folder as holding a tokenizer transformers can load (a fast one, a config naming
# one, BPE's vocabulary, or a SentencePiece model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def missing_tokenizer(folder: str | os.PathLike, hint: str) -> str | None:
    """None when `folder` holds tokenizer files, else the message that refuses it (`hint`: what to do)."""
    if any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return f"no tokenizer in {folder}: looked for {', '.join(TOKENIZER_FILES)}; {hint}"


TRAINING_HINT = "name a folder that has one with --data.tokenizer=DIR"

IGNORE = -100


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend `system_prompt` unless the conversation brings its own system turn (which wins)."""
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> list[int]:
    """The token ids of a conversation as the template renders it, the one rendering training,
    sampling and the length measurements share. With `generation_prompt` it ends with the header
    of the assistant's turn: the prompt the sampler feeds. The template's text already holds every
    special token it wants, so the tokenizer adds none of its own."""
    return tokenizer(_render(tokenizer, messages, generation_prompt), add_special_tokens=False)["input_ids"]


def special_tokens(tokenizer: Any) -> dict[int, str]:
    """Id -> text of every special token (control tokens data must never contain)."""
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def reply_spans(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character span of each assistant reply in it."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(head) and text.startswith(upto) and len(upto) > len(head)):
            raise DataError(
                f"{where}: the chat template does not render turn {i} as a prefix of the whole conversation, "
                "so its reply cannot be located (templates that rewrite earlier turns are not supported)"
            )
        spans.append((len(head), len(upto)))
    return text, spans


def as_sample(sample: Sample | list[dict[str, str]] | dict[str, Any]) -> Sample:
    """A Sample; a list of chat messages; or a record as a plain dict, in any layout limo/data/sources.py
    reads (LIMO question/solution/answer, `messages`, alpaca), told apart by its keys."""
    if isinstance(sample, Sample):
        return sample
    if isinstance(sample, list):
        return Sample(list(sample), "<messages>")
    if isinstance(sample, dict):
        return to_sample(sample, detect_format(sample, "<record>"), "<record>")  # a DataError names the keys it expected
    raise DataError(
        f"encode: expected a Sample, a list of chat messages or a record dict (limo: question, solution, answer; "
        f"messages: messages; alpaca: instruction, input, output), got {type(sample).__name__}"
    )


def encode(
    sample: Sample | list[dict[str, str]] | dict[str, Any], tokenizer: Any, system_prompt: str | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 outside assistant replies.

    `sample` is anything `as_sample` takes: a LIMO record `{"question", "solution", "answer"}` as it
    sits in a .jsonl line works as it is. Each reply is supervised up to and including the last
    special token of its span (the turn's closing token); a reply span without one is an error,
    since the model would never learn to stop.
    """
    sample = as_sample(sample)
    specials = special_tokens(tokenizer)
    for i, message in enumerate(sample.messages):
        for token in specials.values():
            if token in message["content"]:
                raise DataError(f"{sample.where}: messages[{i}] ({message['role']}) contains the control token {token!r}")
    text, spans = reply_spans(tokenizer, with_system(sample.messages, system_prompt), sample.where)
    # The rendered template already holds every special token it wants (a BOS too, for templates
    # that write one): the tokenizer must not add its own, as the sampler does not either.
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        inside = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]  # tokens overlapping the span
        closing = [t for t in inside if ids[t] in specials]
        if not closing:
            raise DataError(f"{sample.where}: the chat template closes an assistant turn without a special token")
        for t in inside:
            if t > closing[-1]:
                break
            labels[t] = ids[t]
    return ids, labels
