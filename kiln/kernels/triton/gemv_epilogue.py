"""The small-M linears' fused epilogue as Triton device functions, shared by the dense
(`gemv_kernel`), quantized (`qgemv_kernel`) and FP8 (`fp8_gemv_kernel`) kernels: which output columns
a program holds, and the store of a result tile through bias, rotary pairs, residual or gated pairs
(`kiln.kernels.triton.gemv.linear_triton`'s meaning)."""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.rope import rotate_rounded
from kiln.kernels.triton.silu_mul import silu_times


@triton.jit
def _tile_columns(  # type: ignore[no-untyped-def]
    tile, rope_pairs, half_n, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, GATED: tl.constexpr, HALF_D: tl.constexpr
):
    """The output columns of column tile `tile`: BLOCK_N consecutive ones; with ROPE, tiles below
    rope_pairs hold a rotated pair (d, d + HALF_D) of one head and the rest plain pairs after them;
    GATED, gate column `tile` and its up column half_n + tile."""
    if ROPE:
        pair = (tile // HALF_D) * (2 * HALF_D) + tile % HALF_D + tl.arange(0, BLOCK_N) * HALF_D
        plain = 2 * rope_pairs + (tile - rope_pairs) * BLOCK_N + tl.arange(0, BLOCK_N)
        return tl.where(tile < rope_pairs, pair, plain)
    elif GATED:
        return tile + tl.arange(0, BLOCK_N) * half_n
    else:
        return tile * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _rotate_pair(result, cos, sin, stride_cm, stride_sm, offs_m, offs_n, m_ok, HALF_D: tl.constexpr):  # type: ignore[no-untyped-def]
    """Rotary embedding of [BLOCK_M, 2] columns (d, d + HALF_D) of one head: x * cos + rotate_half(x) * sin,
    each product rounded to the output dtype and then their sum (as `kiln.kernels.reference.rope`)."""
    j = tl.arange(0, 2)[None, :]
    value = result.to(tl.float32)
    first = tl.sum(tl.where(j == 0, value, 0.0), axis=1)[:, None]
    second = tl.sum(tl.where(j == 1, value, 0.0), axis=1)[:, None]
    rotated = tl.where(j == 0, -second, first)  # rotate_half: [-x2, x1]
    d = (offs_n % (2 * HALF_D))[None, :]
    c = tl.load(cos + offs_m[:, None] * stride_cm + d, mask=m_ok[:, None], other=0.0).to(tl.float32)
    s = tl.load(sin + offs_m[:, None] * stride_sm + d, mask=m_ok[:, None], other=0.0).to(tl.float32)
    return rotate_rounded(value, rotated, c, s, result)


@triton.jit
def _silu_times_up(result):  # type: ignore[no-untyped-def]
    """silu(gate) * up of [BLOCK_M, 2] = (gate, up) columns -> [BLOCK_M], rounded as
    `kiln.kernels.reference.silu_mul` (silu in float32 rounded to the dtype, then the product)."""
    j = tl.arange(0, 2)[None, :]
    value = result.to(tl.float32)
    gate = tl.sum(tl.where(j == 0, value, 0.0), axis=1)
    up = tl.sum(tl.where(j == 1, value, 0.0), axis=1)
    return silu_times(gate, up, result)


@triton.jit
def _store_tile(  # type: ignore[no-untyped-def]
    result,  # [BLOCK_M, BLOCK_N] float32: the tile's products summed over this split of K
    out,
    offs_m,
    offs_n,
    m_ok,
    n_ok,
    tile,
    pid_k,
    gated_ok,  # GATED: the rows whose gated column `tile` is stored
    stride_om,
    stride_on,
    stride_os,
    bias,
    residual,
    stride_rm,
    stride_rn,
    cos,
    sin,
    stride_cm,
    stride_sm,
    rope_pairs,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    ROPE: tl.constexpr,
    HALF_D: tl.constexpr,
    RESIDUAL: tl.constexpr,
    GATED: tl.constexpr,
):
    """Store the tile: SPLIT > 1, as this split's float32 partial sums; else + bias, rounded to out's
    dtype, then rotated (ROPE, pair tiles), + residual (rounded again), or as silu(gate) * up (GATED)."""
    mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT > 1:
        tl.store(out_ptrs + pid_k * stride_os, result, mask=mask)
    else:
        if HAS_BIAS:
            result += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        result = result.to(out.dtype.element_ty)
        if ROPE:
            if tile < rope_pairs:
                result = _rotate_pair(result, cos, sin, stride_cm, stride_sm, offs_m, offs_n, m_ok, HALF_D)
        if RESIDUAL:
            res = tl.load(residual + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
            result = (res.to(tl.float32) + result.to(tl.float32)).to(out.dtype.element_ty)
        if GATED:
            tl.store(out + offs_m * stride_om + tile * stride_on, _silu_times_up(result), mask=gated_ok)
        else:
            tl.store(out_ptrs, result, mask=mask)
