"""`kiln::linear_silu_mul`: a gate/up projection that writes silu(gate) * up, against the PyTorch
reference on fresh random inputs. Native on CUDA; without a GPU under triton's CPU interpreter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton.gemv import linear_triton  # noqa: E402
from kiln.kernels.triton.gemv_config import prologue_config  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]
SHAPES = [(2048, 8192), (4096, 14336), (640, 1000)] if ON_GPU else [(64, 48), (40, 30)]  # hidden, intermediate

if not ON_GPU and not interpreting():
    pytest.skip(
        "no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True
    )


def close_to_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    """The reference's roundings: the float32 silu may differ by an ulp between implementations, so a
    few units in the last place at most, and almost always identical once rounded."""
    assert got.shape == want.shape and got.dtype == want.dtype
    eps = torch.finfo(want.dtype).eps
    assert torch.all((got.float() - want.float()).abs() <= 4 * eps * want.float().abs() + 1e-30)
    assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tiles", [1, 7])
def test_epilogue_is_silu_mul_of_the_projection(dtype, shape, bias, tiles):
    """A one-hot x picks one weight column exactly, so the kernel's output must be the reference
    silu_mul of that column (+ bias): the pairing and the roundings, free of the product's sums."""
    hidden, inter = shape
    g = torch.Generator().manual_seed(hidden + inter + bias)
    w = (2 * torch.randn(2 * inter, hidden, generator=g)).to(dtype).to(DEVICE)
    b = torch.randn(2 * inter, generator=g).to(dtype).to(DEVICE) if bias else None
    for column in (0, hidden // 2, hidden - 1):
        x = torch.zeros(1, hidden, dtype=dtype, device=DEVICE)
        x[0, column] = 1.0
        projected = w[:, column][None] if b is None else (w[:, column] + b)[None]
        config = replace(prologue_config(0, 1, 2 * inter, hidden), tiles=tiles)  # 7: the last program is partly past N
        got = linear_triton(x, w, b, config, gated=True, constant_weight=True)
        close_to_reference(got, reference.silu_mul(projected))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prologue", ["none", "rms_norm"])
def test_random_rows_match_the_reference_mlp_input(dtype, prologue):
    hidden, inter = SHAPES[0]
    g = torch.Generator().manual_seed(17)
    x = (2 * torch.randn(1, hidden, generator=g)).to(dtype).to(DEVICE)
    w = (torch.randn(2 * inter, hidden, generator=g) * hidden**-0.5).to(dtype).to(DEVICE)
    norm = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE) if prologue == "rms_norm" else None
    got = linear_triton(x, w, None, prologue=prologue, norm_weight=norm, eps=1e-6, gated=True)
    normed = x if norm is None else reference.rms_norm(x, norm, 1e-6)
    want = reference.silu_mul(reference.linear(normed, w)).float()
    assert got.shape == (1, inter)
    assert (got.float() - want).abs().max() <= 2e-2 * (1 + want.abs().max())


def test_the_op_at_one_and_many_rows():
    """kiln::linear_silu_mul: the kernel at one row (on CUDA), the projection then the silu-mul pass
    at more rows; both as `kiln::rms_norm_linear` followed by silu_mul."""
    hidden, inter = SHAPES[0]
    dtype = DTYPES[0]
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(2 * inter, hidden, generator=g) * hidden**-0.5).to(dtype).to(DEVICE)
    norm = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE)
    for rows in (1, 3, 40):
        x = torch.randn(1, rows, hidden, generator=g).to(dtype).to(DEVICE)
        got = torch.ops.kiln.linear_silu_mul(x, w, None, True, norm, 1e-6)
        want = reference.silu_mul(torch.ops.kiln.rms_norm_linear(x, norm, 1e-6, w, None, True))
        assert got.shape == (1, rows, inter)
        if rows == 1 and ON_GPU:  # the kernel's sums, not cuBLAS's
            assert (got.float() - want.float()).abs().max() <= 2e-2 * (1 + want.float().abs().max())
        else:
            close_to_reference(got, want)
