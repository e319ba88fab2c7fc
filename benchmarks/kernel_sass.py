"""Instructions a weight of the one-row quantized kernel's loop, from its sm_90 SASS (no GPU needed).

    python benchmarks/kernel_sass.py

triton compiles `kiln.kernels.triton.qgemv_row_kernel._qrow_kernel` for sm_90 on any machine (the
ptxas and cuobjdump inside its wheel). The loop body's cost is the instruction count of a kernel
whose split holds 3 tiles less that of one holding 1 tile (the loop runs once per tile but appears
once in the code), over the weights a thread handles in one tile. It also counts the loop's
shared-memory and shuffle instructions, which a well-laid-out tile has none of. At copy bandwidth an
H100 SM leaves about 5.7 instructions a weight for int4 and 11 for int8 (3.0 TB/s over 132 SMs at
1.98 GHz, 4 warp-instructions a cycle).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.kernels.triton.qgemv_row_kernel import _qrow_kernel

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
POINTERS = ("x", "scales", "zeros", "bias", "out", "residual", "norm_w", "cos", "sin")
ALIGNED = (*POINTERS, "w", "KB", "N", "K", "stride_wn", "stride_sn", "stride_zn")
QUIET = ("BAR", "LDS", "STS", "SHFL", "LDSM")  # what a layout conversion inside the loop costs


def sass_ops(constants: dict[str, Any], warps: int) -> collections.Counter[str]:
    """Opcode counts of the kernel compiled with these constexprs (pointers and sizes 16-aligned, x's stride 1)."""
    names = _qrow_kernel.arg_names
    signature = {
        n: ("constexpr" if n in constants else "*i32" if n == "w" else "*bf16" if n in POINTERS else "i32")
        for n in names
    }
    signature["eps"] = "fp32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in ALIGNED}
    exprs = {(names.index(n),): v for n, v in constants.items()}
    source = ASTSource(fn=_qrow_kernel, signature=signature, constexprs=exprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(2)] += 1
    return ops


def loop_cost(bits: int, block_n: int, prologue: int, warps: int = 4) -> tuple[float, int]:
    """(instructions a weight, shared-memory/shuffle instructions) of one loop iteration."""
    block_k = 1024
    base = dict(
        stride_xk=1, K_PAD=4096, BITS=bits, GROUP=128 if bits == 4 else 4096, HAS_ZEROS=bits == 4,
        PER_ROW=bits == 8, ASM=True, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k, WPT=2, EVEN_N=True,
        EVEN_K=True, SPLIT=1, PDL=True, EARLY_W=True, PROLOGUE=prologue, RESIDUAL=False, ROPE=False, HALF_D=64,
        GATED=prologue == 2,
    )  # fmt: skip
    one = sass_ops({**base, "KB_PER_SPLIT": block_k}, warps)
    three = sass_ops({**base, "KB_PER_SPLIT": 3 * block_k}, warps)
    weights = block_n * block_k * (2 if bits == 4 else 1) / (32 * warps)
    body = sum(three.values()) - sum(one.values())
    quiet = sum(three[op] - one[op] for op in QUIET)
    return body / weights, quiet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.parse_args()
    print(f"triton {triton.__version__}, sm_90; loop body of _qrow_kernel (4 warps, 1 KB of each weight row a step)")
    print(f"{'weight':18s} {'rows':>4s} {'prologue':>9s} {'instr/weight':>13s} {'smem/shfl':>10s}")
    for bits, label in ((4, "int4 g128 + zeros"), (8, "int8 per channel")):
        for block_n in (4, 8):
            for prologue, name in ((0, "none"), (2, "rms_norm")):
                cost, quiet = loop_cost(bits, block_n, prologue)
                print(f"{label:18s} {block_n:4d} {name:>9s} {cost:13.2f} {quiet:10d}", flush=True)


if __name__ == "__main__":
    main()
