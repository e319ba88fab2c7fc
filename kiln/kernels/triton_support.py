"""Whether kiln's Triton kernels can be used at all: triton importable (checked once); the input dtypes
kiln's CUDA linear kernels take."""

from __future__ import annotations

import functools

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # the linear kernels' (dense, quantized, W8A8) input dtypes


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["triton_importable"]
