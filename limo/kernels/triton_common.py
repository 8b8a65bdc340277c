"""Small pieces shared by the Triton kernels: interpreter detection and a correctly rounded cast.

Triton's CPU interpreter (TRITON_INTERPRET=1, how CI checks kernel numerics) truncates fp32 ->
bf16 casts, where the GPU rounds to nearest even as torch does. `cast` rounds to nearest even
in both, so bf16 results computed in the interpreter are the ones the GPU produces.
"""

from __future__ import annotations

import triton
import triton.language as tl


# Options every launch of ours passes, and limo/kernels/compile_check.py compiles with: FMA
# contraction on, as Triton defaulted to through 3.9 and as our numerics and register baselines
# were measured. Triton 3.9 warns that 3.10 flips the default; naming it keeps our kernels as
# they are, without setting TRITON_DEFAULT_FP_FUSION for every other library in the process.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def interpreting() -> bool:
    """True when @triton.jit kernels run in Triton's CPU interpreter (decided when they are defined)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def cast(x, DTYPE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """x.to(DTYPE), rounded to nearest even. BF16_BY_BITS (the interpreter) rounds bf16 by hand.

    Round to nearest even on the fp32 bit pattern: add 0x7FFF plus the lowest kept bit, then
    drop the low 16 bits; infinities and NaNs keep their class.
    """
    if BF16_BY_BITS:
        if DTYPE == tl.bfloat16:
            xf = x.to(tl.float32)
            bits = xf.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            y = tl.where(xf != xf, xf.to(tl.bfloat16), y)  # a NaN's payload could carry into the sign
        else:
            y = x.to(DTYPE)
    else:
        y = x.to(DTYPE)
    return y
