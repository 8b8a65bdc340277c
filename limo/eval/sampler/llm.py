"""`LLM(model_dir).generate(prompts, params)`: the sampler's one entry point.

It loads the model folder's weights (model.weights) and tokenizer, sizes the paged KV cache,
and loops schedule -> run -> postprocess until every sample has finished. Outputs come back flat
and prompt-major: with n samples per prompt, outputs[i * n + j] is sample j of prompt i.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from limo.data.chat import TOKENIZER_FILES, missing_tokenizer
from limo.eval.sampler.block_manager import BlockManager
from limo.eval.sampler.runner import ModelRunner
from limo.eval.sampler.scheduler import Scheduler
from limo.eval.sampler.sequence import SamplingParams, Sequence
from limo.eval.sampler.stopping import StopChecker
from limo.model.weights import load_pretrained
from limo.tools.dtypes import DTYPES, dtype_of
from limo.tools.progress import progress_bar



@dataclass
class Output:
    """One sample: token_ids are the generated ids only (EOS included when it ended the sample);
    text is their decoding without special tokens, cut before a stop string (None without a
    tokenizer); finish_reason is "stop" (EOS or a stop string) or "length" (max_tokens, or max_model_len reached)."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_of(dtype, allowed=DTYPES)


def _load_tokenizer(folder: Path) -> Any:
    if missing_tokenizer(folder, ""):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _eos_token_ids(model_dir: Path, tokenizer: Any) -> set[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, together."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids |= set(value) if isinstance(value, list) else {value} if isinstance(value, int) else set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _check_sizes(*, memory_fraction: float, kv_cache_gib: float | None, **sizes: int | None) -> None:
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction={memory_fraction} must be in (0, 1]")
    if kv_cache_gib is not None and not kv_cache_gib > 0:
        raise ValueError(f"kv_cache_gib={kv_cache_gib} must be > 0")


def _runner_kwargs(trained: int, source: str, *, block_size: int, num_blocks: int | None, max_num_seqs: int, max_model_len: int | None,
                   max_num_batched_tokens: int | None, memory_fraction: float, kv_cache_gib: float | None,
                   cuda_graphs: bool) -> dict[str, Any]:  # fmt: skip
    """ModelRunner's arguments, the same on every tensor-parallel rank."""
    if max_model_len is not None and max_model_len > trained:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={trained} "
                         f"({source}): RoPE positions past it were never trained")
    max_model_len = max_model_len or trained
    max_num_batched_tokens = max_num_batched_tokens or max_model_len
    if max_num_batched_tokens < max_model_len:
        raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} < max_model_len={max_model_len}: a preempted "
                         "sequence is recomputed in one prefill, so it must fit one step")
    return dict(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                max_num_batched_tokens=max_num_batched_tokens, memory_fraction=memory_fraction, kv_cache_gib=kv_cache_gib,
                cuda_graphs=cuda_graphs)  # fmt: skip


class LLM:
    """A model folder ready to sample from.

    dtype: "bfloat16" | "float16" | "float32" | "float64" or a torch dtype (None: bf16 on CUDA,
    float32 on CPU). num_blocks: KV pages of block_size tokens (None: sized from
    memory_fraction of a GPU's memory; on a CPU from kv_cache_gib, an explicit budget that
    defaults to CPU_KV_CACHE_GIB, as vLLM's CPU backend does, never from the RAM that happens to
    be free). max_model_len (None, and at most: the config's
    max_position_embeddings) bounds prompt + output: as in vLLM, a sample that reaches it ends
    with finish_reason "length" before max_tokens; max_num_batched_tokens (None:
    max_model_len) bounds one prefill step. tokenizer: a folder to load the tokenizer from when
    model_dir has none. cuda_graphs: capture decode as CUDA graphs (CUDA only).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        memory_fraction: float = 0.9,
        kv_cache_gib: float | None = None,
        cuda_graphs: bool = True,
        tokenizer: str | os.PathLike | None = None,
        tensor_parallel_size: int = 1,
    ):
        model_dir = Path(model_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        _check_sizes(block_size=block_size, max_num_seqs=max_num_seqs, num_blocks=num_blocks, max_model_len=max_model_len,
                     max_num_batched_tokens=max_num_batched_tokens, memory_fraction=memory_fraction, kv_cache_gib=kv_cache_gib,
                     tensor_parallel_size=tensor_parallel_size)  # fmt: skip
        dtype = _resolve_dtype(dtype, device)
        loaded = _load_tokenizer(Path(tokenizer) if tokenizer is not None else model_dir)
        if tokenizer is not None and loaded is None:
            raise ValueError(f"tokenizer={tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) there")
        sizes = dict(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                     max_num_batched_tokens=max_num_batched_tokens, memory_fraction=memory_fraction, kv_cache_gib=kv_cache_gib,
                     cuda_graphs=cuda_graphs)  # fmt: skip
        self._tp = None
        if tensor_parallel_size == 1:
            model = load_pretrained(model_dir, dtype=dtype, device=device).eval()
        else:
            from limo.eval.sampler.parallel import TPLayout
            from limo.eval.sampler.workers import TensorParallelGroup
            from limo.model.weights import HFCheckpoint

            args = HFCheckpoint(model_dir).args
            TPLayout(args, 0, tensor_parallel_size)  # a size the shapes do not divide into fails here, before any process starts
            runner_kwargs = _runner_kwargs(args.max_position_embeddings, str(model_dir / "config.json"), **sizes)
            self._tp = TensorParallelGroup(tensor_parallel_size, str(model_dir), dtype, device, runner_kwargs)
            weakref.finalize(self, self._tp.close)
            model = self._tp.model
        try:
            self._setup(model, loaded, _eos_token_ids(model_dir, loaded), str(model_dir / "config.json"), **sizes)
        except BaseException as e:
            if self._tp is not None:
                self._tp.close()
                self._tp.raise_if_dead(e)
            raise

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any = None,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        memory_fraction: float = 0.9,
        kv_cache_gib: float | None = None,
        cuda_graphs: bool = True,
    ) -> LLM:
        """A sampler around a model already in memory (tests, benchmarks: benchmarks/bench_sampler.py
        --host drives it with a null model to measure everything but the forward)."""
        _check_sizes(block_size=block_size, max_num_seqs=max_num_seqs, num_blocks=num_blocks, max_model_len=max_model_len,
                     max_num_batched_tokens=max_num_batched_tokens, memory_fraction=memory_fraction, kv_cache_gib=kv_cache_gib)
        llm = cls.__new__(cls)
        llm._setup(model, tokenizer, set(eos_token_ids), type(model).__name__, block_size=block_size, num_blocks=num_blocks,
                   max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                   memory_fraction=memory_fraction, kv_cache_gib=kv_cache_gib, cuda_graphs=cuda_graphs)  # fmt: skip
        return llm

    def _setup(self, model: Any, tokenizer: Any, eos_token_ids: set[int], source: str, *, block_size: int, num_blocks: int | None,
               max_num_seqs: int, max_model_len: int | None, max_num_batched_tokens: int | None, memory_fraction: float,
               kv_cache_gib: float | None, cuda_graphs: bool) -> None:  # fmt: skip
        self.model, self.tokenizer, self.eos_token_ids = model, tokenizer, eos_token_ids
        self.device, self.dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        if not hasattr(self, "_tp"):
            self._tp = None
        kwargs = _runner_kwargs(model.args.max_position_embeddings, source, block_size=block_size, num_blocks=num_blocks,
                                max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                                memory_fraction=memory_fraction, kv_cache_gib=kv_cache_gib, cuda_graphs=cuda_graphs)  # fmt: skip
        self.max_model_len = kwargs["max_model_len"]
        max_num_batched_tokens = kwargs["max_num_batched_tokens"]
        tp = {} if self._tp is None else dict(control_group=self._tp.control, broadcast=self._tp.broadcast)
        self.runner = ModelRunner(model, **kwargs, **tp)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size)
        self.stop_checker = StopChecker(self.eos_token_ids, self.tokenizer)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.stop_checker)

    def _encode(self, index: int, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is a string but the model folder has no tokenizer: pass token ids or tokenizer=DIR")
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        else:
            ids = list(prompt)
        vocab = self.model.args.vocab_size
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {index}: token id {bad!r} is not an int in [0, {vocab})")
        return ids

    def _request(self, index: int, prompt: str | list[int], params: SamplingParams) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params for prompt {index} must be SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"prompt {index}: stop strings need a tokenizer, and the model folder has none")
        ids = self._encode(index, prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt {index}: {len(ids)} prompt tokens leave no room to generate within max_model_len={self.max_model_len}")
        if len(ids) + params.max_tokens > self.max_model_len:  # the context ends the sample first
            params = replace(params, max_tokens=self.max_model_len - len(ids))
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))  # a CPU tensor: no device sync
        seq = Sequence(ids, params, seed, index)
        self.scheduler.check_fits(seq)
        return seq

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams], use_tqdm: bool = True,
        on_finish: Callable[[Output], None] | None = None,
    ) -> list[Output]:
        """Sample every prompt; one Output per (prompt, sample), prompt-major. `on_finish` sees each
        Output as its sample finishes (to write it down before the others are done)."""
        if not isinstance(prompts, list):
            raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt")
        seqs = [self._request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]  # all checked before any runs
        for seq in seqs:
            self.scheduler.add(seq)
        finished: list[Sequence] = []
        bar = progress_bar(sum(sp.n for sp in params), "Generating", "sample", disable=not use_tqdm)
        try:
            while not self.scheduler.done:
                start = time.perf_counter()
                batch = self.scheduler.schedule()
                token_ids = self.runner.run(batch)
                done = self.scheduler.postprocess(batch, token_ids)
                finished += done
                for s in done if on_finish is not None else ():
                    on_finish(self._output(s))
                rate = batch.num_tokens / (time.perf_counter() - start)
                kind = "prefill" if batch.is_prefill else "decode"
                bar.set_postfix_str(f"{kind} {rate:,.0f} tok/s, batch {len(batch.targets)}", refresh=False)
                bar.update(len(done))
        except BaseException as e:
            self.scheduler.abort_all()
            if self._tp is not None:  # the ranks may be between two collectives: the group cannot run another step
                try:
                    self._tp.raise_if_dead(e)  # a collective that failed because a worker died: say which
                finally:
                    self._tp.close(abort=True)
            raise
        finally:
            bar.close()
        if not self.block_manager.all_free():
            raise RuntimeError(f"KV pages leaked: {self.block_manager.num_free} of {self.block_manager.num_blocks} free after generate")
        finished.sort(key=lambda s: (s.prompt_index, s.sample_index))
        return [self._output(s) for s in finished]

    def close(self) -> None:
        """Stop the tensor-parallel workers (also done when the LLM is collected or the process exits)."""
        if self._tp is not None:
            self._tp.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _output(self, s: Sequence) -> Output:
        return Output(s.prompt_index, s.sample_index, s.token_ids[: s.num_prompt_tokens], s.generated, self.stop_checker.text(s),
                      s.finish_reason)  # fmt: skip
