"""Collectives spelled once for every torch the project allows (pyproject: torch >= 2.10)."""

from __future__ import annotations

import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single: same arguments.
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
