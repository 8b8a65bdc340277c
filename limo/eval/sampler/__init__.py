"""Paged-KV sampler: `from limo.eval.sampler import LLM, SamplingParams, Output`.

sequence (requests and samples) -> block_manager (KV pages, pure Python) -> scheduler
(continuous batching, preemption by recompute) -> runner (packed prefill, paged decode, CUDA
graphs) -> sampling (greedy / temperature / top-k / top-p, seeded) -> llm (LLM.generate).
"""

from limo.eval.sampler.llm import LLM, Output
from limo.eval.sampler.sequence import SamplingParams

__all__ = ["LLM", "Output", "SamplingParams"]
