"""Kernel tests run natively on CUDA, else under triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, which happens when
`kiln.kernels.triton` is first imported (lazily, by the tests in this folder).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
