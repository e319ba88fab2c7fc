"""A KV cache in FP8 (E4M3) or int8: how keys and values are stored and read back.

A narrow cache holds k / k_scale (and v / v_scale) rounded to its dtype, one float scale per layer
and plane, constants of the program (`kiln::paged_attention`'s k_scale, v_scale). Reading multiplies
back in float32. A cache of the model's dtype stores values as they are (the scales are 1.0 there).
"""

from __future__ import annotations

import torch

from kiln.kernels.activation_quant import FP8, round_to

KV_CACHE_DTYPES = {"fp8": FP8, "int8": torch.int8}
NARROW = tuple(KV_CACHE_DTYPES.values())


def is_narrow(dtype: torch.dtype) -> bool:
    return dtype in NARROW


def store(values: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """What a cache of `cache_dtype` holds for `values` (a narrow one: values / scale, rounded)."""
    if not is_narrow(cache_dtype):
        return values.to(cache_dtype)
    return round_to(values.float() / scale, cache_dtype)


def load(stored: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The values a cache's entries stand for, in `dtype`."""
    if not is_narrow(stored.dtype):
        return stored
    return (stored.float() * scale).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A narrow tensor viewed as uint8 (CPU torch has no index_copy_ for float8), else itself."""
    return t.view(torch.uint8) if is_narrow(t.dtype) else t


__all__ = ["KV_CACHE_DTYPES", "NARROW", "as_bytes", "is_narrow", "load", "store"]
