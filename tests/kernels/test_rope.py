"""Rotary embedding of fused q/k/v projections: the Triton pass over many rows and the one-row
projection kernel's epilogue, against `kiln.kernels.reference.rope` on fresh random inputs.

Both round as the reference does (each product to the input dtype, then the sum), so in half
precision they must match it bit for bit. Native on CUDA; without a GPU under triton's CPU
interpreter (set by this folder's conftest).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton.gemv import linear_triton  # noqa: E402
from kiln.kernels.triton.gemv_config import prologue_config  # noqa: E402
from kiln.kernels.triton.rope import rope_  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]
# (head_dim, query heads, key/value heads, hidden)
LAYOUTS = [(64, 32, 8, 2048), (128, 12, 4, 640)] if ON_GPU else [(16, 4, 2, 64), (8, 3, 3, 40)]

if not ON_GPU and not interpreting():
    pytest.skip(
        "no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True
    )


def tables(rows: int, head_dim: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of random positions and Llama's frequencies, as transformers computes and rounds them."""
    positions = torch.randint(0, 4096, (rows, 1), generator=g).float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.cat((positions * inv_freq, positions * inv_freq), dim=-1)
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rows", [1, 5, 300 if ON_GPU else 19])
def test_rope_pass_matches_the_reference_bit_for_bit(dtype, layout, rows):
    head_dim, q_heads, kv_heads, _ = layout
    g = torch.Generator().manual_seed(rows + head_dim)
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = (3 * torch.randn(rows, width, generator=g)).to(dtype).to(DEVICE)
    cos, sin = tables(rows, head_dim, dtype, g)
    rope_width = (q_heads + kv_heads) * head_dim
    want = reference.rope(qkv, cos, sin, rope_width)
    got = rope_(qkv.clone(), cos, sin, rope_width)
    assert torch.equal(got, want)
    assert torch.equal(got[:, rope_width:], qkv[:, rope_width:])  # values untouched
    assert not torch.equal(got[:, :rope_width], qkv[:, :rope_width])


def test_rope_pass_takes_rows_further_apart_and_no_rows():
    g = torch.Generator().manual_seed(7)
    head_dim = LAYOUTS[0][0]
    wide = torch.randn(6, 4 * head_dim + 8, generator=g).to(DTYPES[0]).to(DEVICE)
    view = wide[:, : 4 * head_dim]
    cos, sin = tables(6, head_dim, DTYPES[0], g)
    want = reference.rope(view, cos, sin, 3 * head_dim)
    rope_(view, cos, sin, 3 * head_dim)
    assert torch.equal(view, want)
    empty = torch.empty(0, 4 * head_dim, dtype=DTYPES[0], device=DEVICE)
    assert rope_(empty, cos[:0], sin[:0], 2 * head_dim) is empty


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tiles", [1, 7])
def test_projection_epilogue_rotates_bit_for_bit(dtype, layout, bias, tiles):
    """One row whose x picks one weight column (a one-hot x: every sum is exact): the kernel's q/k
    columns are exactly the reference rotation of that column (+ bias), its v columns the column."""
    head_dim, q_heads, kv_heads, hidden = layout
    g = torch.Generator().manual_seed(hidden + head_dim + bias)
    n = (q_heads + 2 * kv_heads) * head_dim
    w = (3 * torch.randn(n, hidden, generator=g)).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    cos, sin = tables(1, head_dim, dtype, g)
    rope_width = (q_heads + kv_heads) * head_dim
    for column in (0, hidden // 3, hidden - 1):
        x = torch.zeros(1, hidden, dtype=dtype, device=DEVICE)
        x[0, column] = 1.0
        projected = w[:, column][None] if b is None else (w[:, column] + b)[None]
        # 7 tiles: programs straddle heads, and the last one is partly past N
        config = replace(prologue_config(0, 1, n, hidden), tiles=tiles)
        got = linear_triton(x, w, b, config, rope=(cos, sin, rope_width), constant_weight=True)
        assert torch.equal(got, reference.rope(projected, cos, sin, rope_width)), column


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("prologue", ["none", "rms_norm"])
def test_projection_epilogue_matches_the_reference_projection(dtype, layout, prologue):
    """A random row, with and without the RMSNorm prologue: the rotated projection is the reference
    projection rotated, within the projection's tolerance (its sums are rounded differently)."""
    head_dim, q_heads, kv_heads, hidden = layout
    g = torch.Generator().manual_seed(hidden + head_dim)
    n = (q_heads + 2 * kv_heads) * head_dim
    x = (2 * torch.randn(1, hidden, generator=g)).to(dtype).to(DEVICE)
    w = (torch.randn(n, hidden, generator=g) * hidden**-0.5).to(dtype).to(DEVICE)
    norm = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE) if prologue == "rms_norm" else None
    cos, sin = tables(1, head_dim, dtype, g)
    rope_width = (q_heads + kv_heads) * head_dim
    got = linear_triton(x, w, None, prologue=prologue, norm_weight=norm, eps=1e-5, rope=(cos, sin, rope_width))
    normed = x if norm is None else reference.rms_norm(x, norm, 1e-5)
    want = reference.rope(reference.linear(normed, w), cos, sin, rope_width).float()
    assert (got.float() - want).abs().max() <= 2e-2 * (1 + want.abs().max())


def test_the_op_rotates_every_row_count_like_the_reference():
    """kiln::linear_rope: at more than one row the projection (as kiln::rms_norm_linear runs it),
    then the rotary pass (on the CPU: the reference), bit for bit; at one row on CUDA the kernel's
    epilogue, within the projection's tolerance."""
    head_dim, q_heads, kv_heads, hidden = LAYOUTS[0]
    dtype = DTYPES[0]
    g = torch.Generator().manual_seed(5)
    n = (q_heads + 2 * kv_heads) * head_dim
    w = (torch.randn(n, hidden, generator=g) * hidden**-0.5).to(dtype).to(DEVICE)
    norm = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE)
    rope_width = (q_heads + kv_heads) * head_dim
    for rows in (1, 3, 40):
        x = torch.randn(1, rows, hidden, generator=g).to(dtype).to(DEVICE)
        cos, sin = tables(rows, head_dim, dtype, g)
        got = torch.ops.kiln.linear_rope(x, w, None, True, norm, 1e-5, cos[None], sin[None], rope_width)
        projected = torch.ops.kiln.rms_norm_linear(x, norm, 1e-5, w, None, True)
        want = reference.rope(projected.reshape(rows, n), cos, sin, rope_width).view(1, rows, n)
        assert got.shape == (1, rows, n)
        if rows == 1 and ON_GPU:
            assert (got.float() - want.float()).abs().max() <= 2e-2 * (1 + want.float().abs().max())
        else:
            assert torch.equal(got, want), rows
