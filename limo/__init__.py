"""LIMO's engine: fine-tune Qwen2.5 on a few hundred long chains of thought, and evaluate it.

One import package, in layers that import only downward (docs/ARCHITECTURE.md):
tools -> kernels -> model -> data -> engine | eval -> curate. Nothing is imported here, so
`import limo.eval.grading` never pulls in torch.
"""

__version__ = "0.1.0"
