"""The Triton silu(gate) * up against the PyTorch reference on fresh random inputs, bit for bit.

Native on CUDA; without a GPU under triton's CPU interpreter (set by this folder's conftest).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton.silu_mul import BLOCK, silu_mul  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]

if not ON_GPU and not interpreting():
    pytest.skip(
        "no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True
    )


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same roundings as the reference: a few units in the last place apart at most (the float32
    silu itself may differ by an ulp between implementations), and in half precision almost always
    identical once rounded."""
    assert got.shape == want.shape and got.dtype == want.dtype
    eps = torch.finfo(want.dtype).eps
    assert torch.all((got.float() - want.float()).abs() <= 4 * eps * want.float().abs() + 1e-30)
    if want.dtype != torch.float32:
        assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 64), (7, 2 * (BLOCK + 5)), (2, 3, 2 * 96), (300 if ON_GPU else 9, 2 * 1792)])
def test_matches_the_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    gate_up = (4 * torch.randn(shape, generator=g)).to(dtype).to(DEVICE)
    assert_close_to_reference(silu_mul(gate_up), reference.silu_mul(gate_up))


def test_takes_a_strided_view_and_an_empty_batch():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 2 * 128 + 16, generator=g).to(DEVICE)
    view = wide[:, : 2 * 128]  # rows further apart than their width
    assert_close_to_reference(silu_mul(view), reference.silu_mul(view))
    assert silu_mul(torch.empty(0, 2 * 32, device=DEVICE)).shape == (0, 32)
