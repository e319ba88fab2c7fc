"""Round-to-nearest weight quantization: int8 symmetric per output channel, int4 per group with zero points."""

from __future__ import annotations

import torch

from kiln.kernels.quantized_weight import QuantizedWeight

INT8_MAX = 127
INT4_MAX = 15


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """W [N, K] -> int8 values in -127..127 with one scale per row: scale = absmax / 127 (float32)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1, keepdim=True) / INT8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: any scale
    values = torch.round(w / scales).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight(values, scales, None, bits=8, group_size=w.shape[1])


def quantize_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """W [N, K] -> values 0..15 per group of `group_size` columns along K, asymmetric:
    scale = (max - min) / 15, zero = round(-min / scale) clamped to 0..15 (float32)."""
    n, k = weight.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    low = w.amin(dim=2).clamp(max=0.0)  # the range holds 0, so a zero point in 0..15 represents it
    high = w.amax(dim=2).clamp(min=0.0)
    scales = (high - low) / INT4_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-low / scales).clamp(0, INT4_MAX)
    values = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, INT4_MAX)
    return QuantizedWeight(values.reshape(n, k).to(torch.int8), scales, zeros, bits=4, group_size=group_size)


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """int8 per channel (bits=8, group_size ignored) or int4 per group."""
    return quantize_int8(weight) if bits == 8 else quantize_int4(weight, group_size)


__all__ = ["quantize", "quantize_int4", "quantize_int8"]
