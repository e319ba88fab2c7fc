"""Dequantization in registers, shared by the quantized GEMV (`qgemv_kernel`) and GEMM (`qgemm`).

(The GEMV's one-row loop reads the same tensors its own way: see `qgemv_kernel`.)

A packed weight tile is a [BN, BK] block of bytes (`kiln.kernels.quantized_weight`): int8 (read as
uint8) holds one column per byte; int4 holds column j in the low nibble and column j + K/2 in the
high one, so a byte tile at byte offset kb gives two column tiles, kb.. and K/2 + kb...

Integers become float32 without a conversion instruction: `q | 0x4B000000` read as float32 is
exactly 2**23 + q (0 <= q < 2**23), and subtracting 2**23 + zero (+ 128 for int8, stored
offset-binary after flipping the sign bit) is exact, so w = (f - (2**23 + 128? + zero)) * scale
equals `dequantize_packed`'s (value - zero) * scale in float32. Zeros must be integer-valued.

Scales and zeros reach the tile in one of three ways (`GROUP_*`, chosen on the host by
`group_mode`): one group per tile ([BN, 1]), whole groups inside the tile ([BN, BK / group],
spread over the tile by a reshape), or one gathered index per element (any shape).
"""

from __future__ import annotations

import triton
import triton.language as tl

GROUP_TILE = 0  # the tile lies inside one group: one scale per weight row
GROUP_SPLIT = 1  # the tile is whole groups, its first column at a group start
GROUP_GATHER = 2  # anything else: each element's group index


def group_mode(tile_bytes: int, row_bytes: int, group_size: int, force_gather: bool = False) -> int:
    """How a kernel with tiles of `tile_bytes` along a packed row of `row_bytes` reads the scales.
    Tiles start at multiples of tile_bytes (split-K included), and int4's second half starts at
    row_bytes, so both need row_bytes % tile_bytes == 0 for the first two modes."""
    if force_gather or row_bytes % tile_bytes:
        return GROUP_GATHER
    if group_size % tile_bytes == 0:
        return GROUP_TILE
    if tile_bytes % group_size == 0 and group_size & (group_size - 1) == 0:
        return GROUP_SPLIT
    return GROUP_GATHER


@triton.jit
def _as_float(q):  # type: ignore[no-untyped-def]
    """int32 q in [0, 2**23) -> float32 2**23 + q, exactly."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def unpack(raw, BITS: tl.constexpr):  # type: ignore[no-untyped-def]
    """A byte tile -> (first, second) float32 tiles of 2**23 + stored value: int4 low and high
    nibbles (columns j and K/2 + j); int8 the signed byte + 128 (second is the same tile)."""
    u = raw.to(tl.int32)
    if BITS == 4:
        return _as_float(u & 0xF), _as_float(u >> 4)
    else:
        f = _as_float(u ^ 0x80)
        return f, f


@triton.jit
def _group_index(offs_n, stride, col0, cols, GROUP: tl.constexpr, MODE: tl.constexpr, GPT: tl.constexpr):  # type: ignore[no-untyped-def]
    if MODE == 0:
        return offs_n[:, None] * stride + (col0 // GROUP)
    elif MODE == 1:
        return offs_n[:, None] * stride + (col0 // GROUP + tl.arange(0, GPT))[None, :]
    else:
        return offs_n[:, None] * stride + (cols // GROUP)[None, :]


@triton.jit
def group_params(  # type: ignore[no-untyped-def]
    scales,
    zeros,
    offs_n,
    n_ok,
    col0,  # the tile's first column (a multiple of BK)
    cols,  # [BK] its columns
    K,
    stride_sn,
    stride_zn,
    GROUP: tl.constexpr,
    MODE: tl.constexpr,  # GROUP_*
    GPT: tl.constexpr,  # GROUP_SPLIT: groups per tile (BK // GROUP), else 1
    HAS_ZEROS: tl.constexpr,
):
    """(scale, zero) float32 of the tile's groups, compact: [BN, 1] (GROUP_TILE), [BN, GPT]
    (GROUP_SPLIT) or [BN, BK] (GROUP_GATHER); zero 0 without zero points, scale 0 past N and K."""
    if MODE == 2:
        ok = n_ok[:, None] & (cols < K)[None, :]
    else:
        ok = n_ok[:, None]
    s = tl.load(scales + _group_index(offs_n, stride_sn, col0, cols, GROUP, MODE, GPT), mask=ok, other=0.0)
    s = s.to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(zeros + _group_index(offs_n, stride_zn, col0, cols, GROUP, MODE, GPT), mask=ok, other=0.0)
        z = z.to(tl.float32)
    else:
        z = s * 0.0
    return s, z


@triton.jit
def spread(p, MODE: tl.constexpr, GPT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # type: ignore[no-untyped-def]
    """A compact group parameter from `group_params` over its tile's elements ([BN, 1] stays so)."""
    if MODE == 1:
        return tl.reshape(tl.broadcast_to(p[:, :, None], (BN, GPT, BK // GPT)), (BN, BK))
    else:
        return p


@triton.jit
def dequantize(  # type: ignore[no-untyped-def]
    f,  # [BN, BK] float32 from `unpack`
    scales,
    zeros,
    offs_n,
    n_ok,
    col0,
    cols,
    K,
    stride_sn,
    stride_zn,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    MODE: tl.constexpr,
    GPT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """The float32 weight tile (value - zero) * scale (see `group_params`); 0 past N and K."""
    s, z = group_params(scales, zeros, offs_n, n_ok, col0, cols, K, stride_sn, stride_zn, GROUP, MODE, GPT, HAS_ZEROS)
    if BITS == 4:
        zm = z + 8388608.0  # 2**23
    else:
        zm = z + 8388736.0  # 2**23 + 128: int8 read offset-binary
    return (f - spread(zm, MODE, GPT, BN, BK)) * spread(s, MODE, GPT, BN, BK)
