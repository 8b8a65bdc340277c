"""Small pieces shared by the Triton kernels: interpreter detection and a correctly rounded cast.

Triton's CPU interpreter (TRITON_INTERPRET=1, how CI checks kernel numerics) truncates fp32 ->
bf16 casts, where the GPU rounds to nearest even as torch does. `cast` rounds to nearest even
in both, so bf16 results computed in the interpreter are the ones the GPU produces.
"""

from __future__ import annotations

import triton
import triton.language as tl


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


def compile_for_gpu(kernel, signature: dict[str, str], constexprs: dict, num_warps: int, capability: int = 90) -> dict:
    """Compile `kernel` for an NVIDIA GPU of `capability` (90: H100/H200) on a machine without one.

    Triton ships ptxas and cuobjdump, so this catches what the interpreter cannot: code that does
    not lower, register spills, and global accesses narrower than 16 bytes. Pointer, stride and
    width arguments are marked 16-divisible, as Triton specialises them at launch for aligned
    tensors and widths such as 4096, 5120 and 8192. The kernel must have been defined without
    TRITON_INTERPRET. Returns registers, stack and local bytes per thread, and the PTX load and
    store instructions used.
    """
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("compile_for_gpu needs kernels defined without TRITON_INTERPRET=1")
    names = kernel.arg_names
    aligned = {(names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items() if v.startswith("*") or k.startswith(("stride", "n_cols"))}
    source = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    return {
        "regs": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "loads": sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
        "stores": sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
    }
