"""Performance: micro-benchmarks, the training step, the sampler, the CI regression profile and
the LIMO projection. Scripts share helpers through harness.py alone."""
