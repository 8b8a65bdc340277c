"""Training: config, process groups and the FSDP2 plan, optimizer, the step and its loop,
checkpoints, export, metrics, the memory plan and the simulated step. The model and its weights
live in model/; the data pipeline in data/. Training's evaluation runs `python -m limo.eval.run` in a
child process: nothing here imports eval/."""
