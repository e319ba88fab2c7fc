"""`kiln::linear`: `x @ weight.T + bias` that streams the weight with a Triton kernel when x has few rows.

A decode step's linears read a whole weight for 1..16 token rows, so they are bound by memory
bandwidth; `kiln.kernels.triton.gemv` reads the weight once at close to copy speed. The op takes
that path for CUDA fp16/bf16 inputs with one row (all of x's dims but the last), or with up to
`MAX_ROWS` rows when the weight has at least `MIN_MULTI_ROW_BYTES` (on an H100 the kernel beat
cuBLAS at one row for every Llama-3.2-1B / 3.1-8B projection, and at 4 and 16 rows only for
weights of 32 MiB and more: benchmarks/linear_kernels.py), when triton is importable and the
environment variable KILN_LINEAR is not `reference`; everything else (prefill, CPU, fp32,
small weights at 2..16 rows) is `torch.nn.functional.linear`. The choice depends on
shapes, dtypes and the device only, so the op can run inside CUDA graphs.
"""

from __future__ import annotations

import functools
import os

import torch

MAX_ROWS = 16
MIN_MULTI_ROW_BYTES = 32 << 20
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a call takes the Triton path (device, dtypes, row count, environment)."""
    if not (x.is_cuda and x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype and weight.dim() == 2):
        return False
    if weight.numel() >= 2**31:  # the kernel's offsets are 32-bit
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows != 1 and not (1 < rows <= MAX_ROWS and weight.numel() * weight.element_size() >= MIN_MULTI_ROW_BYTES):
        return False
    return os.environ.get("KILN_LINEAR", "") != "reference" and _triton_importable()


@torch.library.custom_op("kiln::linear", mutates_args=())
def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, constant_weight: bool = False
) -> torch.Tensor:
    """constant_weight: no kernel ever writes `weight` (a model parameter); the kernel may then read
    it before the previous kernel has finished (see `kiln.kernels.triton.pdl`)."""
    if use_kernel(x, weight, bias):
        from kiln.kernels.triton.gemv import linear_triton

        out = linear_triton(
            x.reshape(-1, x.shape[-1]),
            weight,
            None if bias is None else bias.contiguous(),
            constant_weight=constant_weight,
        )
        return out.view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


@linear.register_fake
def _linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, constant_weight: bool = False
) -> torch.Tensor:
    # Both paths return a new contiguous tensor.
    return x.new_empty(*x.shape[:-1], weight.shape[0])
