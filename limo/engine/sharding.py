"""The FSDP2 sharding plan, applied to the model from outside it.

Order (torchtitan's parallelize step): activation checkpointing -> torch.compile per block ->
`fully_shard` per decoder block -> `fully_shard([norm, lm_head])` -> `fully_shard(embed_tokens)`
-> `fully_shard(root)`. The model is built on the meta device; limo/model/init.py's `materialize` then
gives each rank only its own shards. No rank ever holds the whole model.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from limo.engine.config import ParallelConfig
from limo.model.qwen2 import Qwen2


def parallelize(model: Qwen2, mesh: DeviceMesh, cfg: ParallelConfig, param_dtype: torch.dtype) -> Qwen2:
    """Apply checkpointing, compile and the FSDP2 plan in place; returns the same model.

    Gradients are reduced in fp32 and summed, not averaged: the loss is already divided by the
    global number of supervised tokens, so the sum over ranks is the gradient of the global mean.
    """
    if cfg.cpu_offload and mesh.device_type != "cuda":
        raise ValueError(f"parallel.cpu_offload=true moves sharded state from GPU to host memory: it needs CUDA devices, this run is on {mesh.device_type}")
    for i, layer in enumerate(model.layers):
        if cfg.activation_checkpointing == "full" or (cfg.activation_checkpointing == "selective" and i % 2 == 0):
            model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
        if cfg.compile:
            model.layers[i].compile()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload: OffloadPolicy = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
    shard = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **shard)
    if not model.args.tie_word_embeddings:
        # Backward starts with the head: keeping it gathered after forward saves one all-gather.
        fully_shard([model.norm, model.lm_head], reshard_after_forward=False, **shard)
        fully_shard(model.embed_tokens, reshard_after_forward=cfg.reshard_after_forward, **shard)
    # A tied embedding is one parameter used at both ends of the model: it stays in the root group.
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **shard)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: every backend has it (gloo lacks PREMUL_SUM)
    if cfg.prefetch:
        layers = list(model.layers)
        for i, layer in enumerate(layers):
            layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 1 + cfg.prefetch])
            layer.set_modules_to_backward_prefetch(layers[max(0, i - cfg.prefetch) : i][::-1])
    return model
