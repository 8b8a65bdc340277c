"""The Qwen2 model as the Qwen2.5 family uses it, and what belongs to it alone: its weights in Hugging
Face folders (weights.py) and their content hash (fingerprint.py), its initial values on any
number of ranks (init.py), its FLOP count (flops.py). It imports only kernels/, tools/ and torch.
"""
