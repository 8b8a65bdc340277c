"""Performance: micro-benchmarks, the training step, the sampler, the CI regression profile and
the LIMO projection. Scripts share helpers through harness.py alone.

Without a CUDA device, every script runs our Triton kernels in Triton's CPU interpreter (smoke
sweeps check that the code runs, not its speed). The choice is made here, before any script
imports the kernels: a @triton.jit function is bound to it when it is defined. TRITON_INTERPRET
set by the caller wins."""

import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        print("benchmarks: no CUDA device: our Triton kernels run in Triton's CPU interpreter (for numerics, not speed)",
              file=sys.stderr, flush=True)
