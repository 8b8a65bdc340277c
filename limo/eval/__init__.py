"""Evaluation: the paged-KV sampler (sampler/), answer grading, LIMO's protocol over the suites
of limo/data/suites.py (run.py), and the grader's agreement with the Qwen2.5-Math harness. It imports
model/ (the sampler runs it) and data/ (chat rendering, the suites), never engine/."""
