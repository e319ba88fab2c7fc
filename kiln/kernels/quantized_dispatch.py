"""Where a quantized linear op finds its CUDA kernel.

`quantized_kernel` is the one entry the ops of `kiln.kernels.linear` call for a packed weight
(`kiln.kernels.quantized_weight`): the result of a kernel that dequantizes in registers, or None
when none applies to these rows, dtypes or device, and the op then runs its reference path
(`dequantize_packed` + the dense op), which is also the CPU path.
"""

from __future__ import annotations

from typing import Any

import torch


def quantized_kernel(
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    constant_weight: bool,
    prologue: str,
    norm_weight: torch.Tensor | None,
    eps: float,
    **epilogue: Any,
) -> torch.Tensor | None:
    """x's rows [M, K] through a quantized kernel -> [M, N] (or [M, N / 2] gated), or None.

    prologue: "none" | "rms_norm" | "silu_mul"; epilogue: residual=[M, N] | rope=(cos, sin, width) |
    gated=True, with `kiln.kernels.triton.gemv.linear_triton`'s meaning. No kernel is wired in yet."""
    return None
