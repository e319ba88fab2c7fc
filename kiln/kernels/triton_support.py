"""Whether kiln's Triton kernels can be used at all: triton importable (checked once)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["triton_importable"]
