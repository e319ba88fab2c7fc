"""Greedy token choice: `torch.argmax(logits, dim=-1)`, with a parallel Triton kernel on CUDA.

The Triton path (`kiln.kernels.triton.argmax`) reads each row at full bandwidth where
`torch.argmax` reduces a row in one thread block; it gives the same indices (lowest index among
equal maxima, NaN first). It is taken for CUDA tensors when triton is importable and the
kernel selection's `argmax` is not `reference` (`kiln.kernels.selection`).
"""

from __future__ import annotations

import torch

from kiln.kernels.selection import current
from kiln.kernels.triton_support import triton_importable


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value in a [B, V] tensor, as int64 [B] on its device."""
    if (
        logits.is_cuda
        and logits.dim() == 2
        and logits.stride(1) == 1
        and logits.shape[1] > 0
        and current().argmax != "reference"
        and triton_importable()
    ):
        from kiln.kernels.triton.argmax import argmax_rows as triton_argmax_rows

        return triton_argmax_rows(logits)
    return torch.argmax(logits, dim=-1)


__all__ = ["argmax_rows"]
