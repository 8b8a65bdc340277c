"""Floating-point dtypes by name: the one table that configs, command lines and benchmarks read.

torch's own names (`bfloat16`) are what configs and the sampler take; the short ones (`bf16`) are
what kernel benchmarks print in their case names. Both resolve here, and a name that is neither
is an error that lists the choices."""

from __future__ import annotations

from collections.abc import Iterable

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_NAMES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def dtype_of(name: str | torch.dtype, *, allowed: Iterable[str] | None = None, what: str = "dtype") -> torch.dtype:
    """The torch dtype `name` stands for (torch's name or the short one; a torch.dtype passes
    through). `allowed` narrows the choices; `what` names the setting in the error."""
    by_name = {c: DTYPES[SHORT_NAMES.get(c, c)] for c in (allowed if allowed is not None else [*DTYPES, *SHORT_NAMES])}
    if isinstance(name, torch.dtype):
        if name in by_name.values():
            return name
    elif name in by_name:
        return by_name[name]
    raise ValueError(f"{what}={name!r}; allowed: {', '.join(by_name)}")
