"""Quantizing a linear's input to its weight's type (FP8 E4M3 or int8), and the PyTorch meaning of it.

A W8A8 linear rounds its input x to 8 bits before the product: dynamic per token (each row its own
scale, absmax / QMAX) or static per tensor (a calibrated `input_scale` [1]). `quantize_input` gives
the 8-bit rows and their float32 scales [M, 1] (what `torch._scaled_mm` / `torch._int_mm` take);
`fake_quantize` gives x as the 8-bit rows stand for it, in x's dtype, which the CPU path multiplies
with the dequantized weight (both computed in float32, so CPU engines match a reference exactly).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3
INT8_MAX = 127.0
MODES = ("dynamic", "static")


def qmax(dtype: torch.dtype) -> float:
    if dtype == FP8:
        return FP8_MAX
    if dtype == torch.int8:
        return INT8_MAX
    raise ValueError(f"activations quantize to float8_e4m3fn or int8, not {dtype}")


def round_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values already divided by their scale -> `dtype` (saturating; int8 rounds to nearest even)."""
    limit = qmax(dtype)
    clipped = values.clamp(-limit, limit)
    return clipped.to(FP8) if dtype == FP8 else torch.round(clipped).to(torch.int8)


def input_scales(x: torch.Tensor, mode: str, dtype: torch.dtype, input_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 scales [M, 1] for x's rows [M, K]."""
    if mode == "static":
        if input_scale is None:
            raise ValueError("static activation quantization needs an input_scale")
        return input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    if mode != "dynamic":
        raise ValueError(f"activation mode must be one of {MODES}, got {mode!r}")
    amax = x.float().abs().amax(dim=1, keepdim=True)
    scale = amax / qmax(dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_input(
    x: torch.Tensor, mode: str, dtype: torch.dtype, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows [M, K] -> (8-bit rows [M, K] of `dtype`, float32 scales [M, 1])."""
    scales = input_scales(x, mode, dtype, input_scale)
    return round_to(x.float() / scales, dtype), scales


def fake_quantize(x: torch.Tensor, mode: str, dtype: torch.dtype, input_scale: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] as its 8-bit quantization stands for it, in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    q, scales = quantize_input(flat, mode, dtype, input_scale)
    return (q.float() * scales).to(x.dtype).reshape(x.shape)


__all__ = ["FP8", "FP8_MAX", "INT8_MAX", "MODES", "fake_quantize", "input_scales", "qmax", "quantize_input"]
