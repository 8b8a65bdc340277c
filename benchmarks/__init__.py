"""Micro-benchmarks and the regression profiler."""
