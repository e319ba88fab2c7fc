"""Triton kernel: rotary embedding of the query and key heads of a fused q/k/v projection, in place.

`kiln::linear_rope` applies the rotation inside the projection's kernel at one row (decode at
batch 1); at more rows the projection is cuBLAS, and this kernel then rotates the first
`rope_width` columns of its [rows, N] output in one pass (Inductor needed two kernels for it, the
rotated half going through a transposed temporary). Rounded as `kiln.kernels.reference.rope` and
transformers: each product rounded to the input dtype, then their sum. That needs the kernel
compiled without floating-point contraction (`enable_fp_fusion=False`, as Inductor compiles under
`emulate_precision_casts`): with it, the backend narrows the rounded fp32 arithmetic to half
precision and fuses one product into the sum (`fma.rn.bf16`), one rounding fewer, which made about
one value in a thousand one unit in the last place off on an H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import handoff, launch_options

HEADS_PER_PROGRAM = 8


@triton.jit
def rotate_rounded(x, rotated, c, s, like):  # type: ignore[no-untyped-def]
    """x * c + rotated * s in like's dtype, for float32 operands holding values of that dtype: each
    product rounded to it, then the sum (transformers' `apply_rotary_pos_emb`, op by op)."""
    a = (x * c).to(like.dtype).to(tl.float32)
    b = (rotated * s).to(like.dtype).to(tl.float32)
    return (a + b).to(like.dtype)


@triton.jit
def _rope_kernel(  # type: ignore[no-untyped-def]
    x,  # [rows, N], last dim contiguous: rotated in place
    cos,  # [rows, HEAD_DIM], last dim contiguous
    sin,
    num_heads,  # rope_width // HEAD_DIM
    stride_xr,
    stride_cr,
    stride_sr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    handoff(PDL)
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HEAD_DIM)
    half: tl.constexpr = HEAD_DIM // 2
    partner = (offs + half) % HEAD_DIM
    ok = (heads < num_heads)[:, None]
    base = x + row * stride_xr + heads[:, None] * HEAD_DIM
    value = tl.load(base + offs[None, :], mask=ok, other=0.0)
    other = tl.load(base + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    rotated = tl.where(offs[None, :] < half, -other, other)  # rotate_half: [-x2, x1]
    c = tl.load(cos + row * stride_cr + offs).to(tl.float32)[None, :]
    s = tl.load(sin + row * stride_sr + offs).to(tl.float32)[None, :]
    tl.store(base + offs[None, :], rotate_rounded(value.to(tl.float32), rotated, c, s, value), mask=ok)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_width: int) -> torch.Tensor:
    """Rotate the first rope_width columns of x [rows, N] in place (see `kiln.kernels.reference.rope`); returns x."""
    rows, head_dim = x.shape[0], cos.shape[-1]
    assert x.dim() == 2 and x.stride(-1) == 1, (tuple(x.shape), x.stride())
    assert cos.shape == sin.shape == (rows, head_dim) and cos.stride(-1) == sin.stride(-1) == 1
    assert head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim} must be a power of two"
    assert rope_width % head_dim == 0 and rope_width <= x.shape[1], (rope_width, head_dim, tuple(x.shape))
    num_heads = rope_width // head_dim
    if rows == 0 or num_heads == 0:
        return x
    pdl = pdl_enabled(x.device)
    block_h = min(HEADS_PER_PROGRAM, triton.next_power_of_2(num_heads))
    _rope_kernel[(rows, triton.cdiv(num_heads, block_h))](
        x,
        cos,
        sin,
        num_heads,
        x.stride(0),
        cos.stride(0),
        sin.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        PDL=pdl,
        num_warps=4,
        enable_fp_fusion=False,  # see the module docstring
        **launch_options(pdl),
    )
    return x


__all__ = ["rope_"]
