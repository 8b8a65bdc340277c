"""The one seam between the evaluation harness and whatever generates text.

The harness asks for completions with `Generator.__call__(requests) -> completions`, one
completion per request, in order; every request carries its own sampling settings and seed, so
a resumed run asks for exactly the samples an uninterrupted one would have.

Two generators:
  LLMGenerator:          our paged-KV sampler (eval.sampler.LLM), the engine for real runs.
  TransformersGenerator: transformers' `generate`, one request at a time: slow, for small models,
                         tests and as the reference the sampler is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from limo.data.chat import render_ids, with_system


@dataclass(frozen=True)
class Request:
    """One sample to generate: a chat (system + user message) and how to sample it."""

    system: str
    user: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class Completion:
    """Generated text only (no prompt); finish_reason "stop" (EOS or stop string) or "length"."""

    text: str
    finish_reason: str
    num_tokens: int


OnDone = Callable[[int, Completion], None]  # (index of the request, its completion), as each one finishes


class Generator(Protocol):
    """Completions for requests, in their order. A generator that takes `on_done` reports each
    completion as it finishes, so that a run interrupted mid-batch keeps what was done; one that
    does not has its batch written when the call returns."""

    def __call__(self, requests: Sequence[Request], on_done: OnDone | None = None) -> list[Completion]: ...


def prompt_ids(tokenizer: Any, request: Request) -> list[int]:
    """The request as the model sees it: the system and user turns, then the assistant's header."""
    return render_ids(tokenizer, with_system([{"role": "user", "content": request.user}], request.system), generation_prompt=True)


def _check_completions(requests: Sequence[Request], completions: list[Completion], who: str) -> list[Completion]:
    if len(completions) != len(requests):
        raise RuntimeError(f"{who} returned {len(completions)} completions for {len(requests)} requests")
    for c in completions:
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"{who} returned finish_reason {c.finish_reason!r}; expected 'stop' or 'length'")
    return completions


class LLMGenerator:
    """Adapter over eval.sampler.LLM: `generate(prompts, params)` returns one Output per
    (prompt, sample), flat and prompt-major, with prompt_index / sample_index / token_ids / text /
    finish_reason. Each request is its own prompt with n=1 and its own seed."""

    def __init__(self, llm: Any, sampling_params: Callable[..., Any] | None = None, use_tqdm: bool = True):
        if sampling_params is None:
            from limo.eval.sampler import SamplingParams as sampling_params
        self.llm, self.sampling_params, self.use_tqdm = llm, sampling_params, use_tqdm

    def __call__(self, requests: Sequence[Request], on_done: OnDone | None = None) -> list[Completion]:
        prompts = [prompt_ids(self.llm.tokenizer, r) for r in requests]
        params = [self.sampling_params(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed, n=1)
                  for r in requests]
        streaming = {} if on_done is None else {"on_finish": lambda o: on_done(o.prompt_index, _completion(o))}
        outputs = sorted(self.llm.generate(prompts, params, use_tqdm=self.use_tqdm, **streaming), key=lambda o: (o.prompt_index, o.sample_index))
        if [o.prompt_index for o in outputs] != list(range(len(requests))):
            raise RuntimeError(f"the sampler returned outputs for prompts {[o.prompt_index for o in outputs][:10]}..., "
                               f"expected exactly one for each of {len(requests)}")
        return _check_completions(requests, [_completion(o) for o in outputs], "the sampler")


def _completion(output: Any) -> Completion:
    return Completion(output.text, output.finish_reason, len(output.token_ids))


class TransformersGenerator:
    """transformers' generate on one request at a time (seeded per request). Explicitly chosen
    with `--engine transformers`; never a silent stand-in for the sampler."""

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from limo.tools.dtypes import dtype_of  # torch, like transformers, only in a process that generates

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype_of(dtype)).to(device).eval()
        self.device = device
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def __call__(self, requests: Sequence[Request], on_done: OnDone | None = None) -> list[Completion]:
        completions = []
        for i, r in enumerate(requests):
            ids = self.torch.tensor([prompt_ids(self.tokenizer, r)], device=self.device)  # [1, P]
            self.torch.manual_seed(r.seed)
            sampling = dict(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=0) if r.temperature > 0 else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            with self.torch.no_grad():
                out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=r.max_tokens,
                                          eos_token_id=sorted(self.eos_ids), pad_token_id=sorted(self.eos_ids)[0], **sampling)
            new = out[0, ids.shape[1]:].tolist()  # intended host sync: the tokens become text
            stopped = bool(new) and new[-1] in self.eos_ids
            text = self.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
            completions.append(Completion(text, "stop" if stopped else "length", len(new)))
            if on_done is not None:
                on_done(i, completions[-1])
        return _check_completions(requests, completions, "transformers")


def as_generator(obj: Any) -> Generator:
    """An eval.sampler.LLM (anything with .generate and .tokenizer) wrapped in LLMGenerator; a
    Generator passed through."""
    if hasattr(obj, "generate") and hasattr(obj, "tokenizer"):
        return LLMGenerator(obj)
    if callable(obj):
        return obj
    raise TypeError(f"expected an eval.sampler.LLM or a Generator (callable on a list of Requests), got {type(obj).__name__}")
