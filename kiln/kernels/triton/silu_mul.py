"""Triton kernel: silu(gate) * up of a fused [gate | up] projection, in one pass over the rows.

At many rows (prefill, large decode batches) the MLP's silu(gate) * up ran as two PyTorch
kernels (silu, then the product), reading and writing the intermediate twice: on an H100 with
6,000 prompt tokens of Llama-3.1-8B that was 17 ms of a 164 ms step. One kernel reads gate and
up once and writes the product once. It rounds like `kiln.kernels.reference.silu_mul` (and
transformers): silu in float32, rounded to the input dtype, then the product rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import handoff, launch_options

BLOCK = 1024


@triton.jit
def silu_times(gate, up, like):  # type: ignore[no-untyped-def]
    """silu(gate) * up in like's dtype, for float32 operands holding values of that dtype: silu in
    float32 rounded to the dtype, then the product rounded again (`reference.silu_mul`)."""
    silu = (gate / (1.0 + tl.exp(-gate))).to(like.dtype)
    return (silu.to(tl.float32) * up).to(like.dtype)


@triton.jit
def _silu_mul_kernel(  # type: ignore[no-untyped-def]
    gate_up,  # [rows, 2 * width], last dim contiguous
    out,  # [rows, width], contiguous
    width,
    stride_row,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    handoff(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < width
    base = gate_up + row * stride_row
    gate = tl.load(base + offs, mask=ok, other=0.0)
    up = tl.load(base + width + offs, mask=ok, other=0.0)
    tl.store(out + row * width + offs, silu_times(gate.to(tl.float32), up.to(tl.float32), gate), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] on the last dim -> [..., width] in gate_up's dtype."""
    width = gate_up.shape[-1] // 2
    assert gate_up.shape[-1] == 2 * width, f"an odd last dim {gate_up.shape[-1]} cannot be [gate | up]"
    rows = gate_up.numel() // max(gate_up.shape[-1], 1)
    flat = gate_up.reshape(rows, 2 * width)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or width == 0:
        return out
    pdl = pdl_enabled(gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(width, BLOCK))](
        flat, out, width, flat.stride(0), BLOCK=BLOCK, PDL=pdl, num_warps=4, **launch_options(pdl)
    )
    return out


__all__ = ["silu_mul"]
