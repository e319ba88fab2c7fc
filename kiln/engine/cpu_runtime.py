"""The few names an Inductor CPU output module imports from torch._inductor, without importing it.

`kiln.compiler.cpu_module` rewrites the module's imports of these names to this module (importing any
part of torch._inductor imports torch._dynamo: a second a load); the build checks that each one is
what Inductor's is for the program (the same torch functions, the same alignment).
"""

from __future__ import annotations

from typing import Any

import torch

ALIGN_BYTES = 64  # torch._inductor.utils.ALIGN_BYTES, checked at build


def align(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of ALIGN_BYTES (Inductor's `_align`)."""
    return (nbytes + ALIGN_BYTES - 1) & -ALIGN_BYTES


class _ExternKernels:
    """Inductor's `extern_kernels`: the torch functions the generated code calls by name (`mm`, `addmm`)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


extern_kernels = _ExternKernels()


class AsyncCompile:
    """Stands in for Inductor's compiler pool: the kernels are already compiled (see `_kiln_kernel`)."""

    def wait(self, scope: dict[str, Any]) -> None:
        pass
