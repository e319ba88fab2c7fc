"""How kiln's Triton attention kernels store and read a narrow (FP8 E4M3 / int8) KV cache.

The meaning is `kiln.kernels.kv_quant`'s: a narrow cache holds value / scale rounded to its type
(saturating, round to nearest even), one float scale per layer and plane; reading multiplies back
in float32 and rounds to the query's dtype. A cache of the model's dtype (PLAIN) holds values as
they are. The scales are plain float arguments of the launches (constants of the program), so a
captured CUDA graph keeps them.

FP8 is written as bytes computed with integer operations (exact, the same under the interpreter,
whose float32 -> float8 conversion is not round-to-nearest-even, and on the GPU), and read through
a float8e4nv bitcast (one conversion instruction on GPUs with FP8; the interpreter agrees).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAIN = 0
FP8 = 1
INT8 = 2
KINDS = {torch.float8_e4m3fn: FP8, torch.int8: INT8}


def kind(cache_dtype: torch.dtype) -> int:
    """The codec of a cache of `cache_dtype` (PLAIN unless narrow)."""
    return KINDS.get(cache_dtype, PLAIN)


def kernel_view(cache: torch.Tensor) -> torch.Tensor:
    """The cache as the kernels address it: an FP8 cache as its bytes (uint8), else itself."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


@triton.jit
def _e4m3_bits(x):  # type: ignore[no-untyped-def]
    """float32 x -> the E4M3 byte nearest to it (ties to even; |x| > 448 saturates to +-448), as int32."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # normal (a >= 2**-6): round float32's 23 mantissa bits to 3 (a carry moves into the exponent),
    # then rebias the exponent from 127 to 7
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal (steps of 2**-9): round a * 512 to an integer, ties to even, by adding 2**23
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    return tl.where(a < 0.015625, sub, normal) | sign


@triton.jit
def encode(values, scale, out_ptr, KV: tl.constexpr):  # type: ignore[no-untyped-def]
    """What a cache (elements of out_ptr's type) holds for `values`."""
    if KV == 1:
        return _e4m3_bits(tl.math.div_rn(values.to(tl.float32), scale)).to(tl.uint8)
    elif KV == 2:
        x = tl.minimum(tl.maximum(tl.math.div_rn(values.to(tl.float32), scale), -127.0), 127.0)
        return ((x + 12582912.0) - 12582912.0).to(tl.int8)  # 1.5 * 2**23: round to nearest even
    else:
        return values.to(out_ptr.dtype.element_ty)


@triton.jit
def decode(stored, scale, like, KV: tl.constexpr):  # type: ignore[no-untyped-def]
    """The values a cache's elements stand for, in like's dtype."""
    if KV == 1:
        return (stored.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale).to(like.dtype)
    elif KV == 2:
        return (stored.to(tl.float32) * scale).to(like.dtype)
    else:
        return stored.to(like.dtype)


@triton.jit
def round_trip(values, scale, like, out_ptr, KV: tl.constexpr):  # type: ignore[no-untyped-def]
    """`values` as a cache stores and then reads them (a key attended before it is read back)."""
    if KV == 0:
        return values.to(like.dtype)
    else:
        return decode(encode(values, scale, out_ptr, KV), scale, like, KV)


__all__ = ["FP8", "INT8", "KINDS", "PLAIN", "decode", "encode", "kernel_view", "kind", "round_trip"]
