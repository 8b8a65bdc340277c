"""The training engine: config, model, weights, parallelism, optimizer, checkpoints, metrics."""
