"""Evaluation: the paged-KV sampler, answer grading and the benchmark harness."""
