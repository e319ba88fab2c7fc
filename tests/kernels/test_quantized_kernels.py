"""The quantized linear kernels (`kiln.kernels.triton.qgemv`, `qgemm`) and `quantized_kernel` against
`dequantize_packed` + the PyTorch reference, on fresh random packed weights and inputs.

On CUDA natively (bf16 and fp16, projection-sized shapes); without a GPU under triton's CPU
interpreter (TRITON_INTERPRET=1, this folder's conftest) with small shapes in fp16. Tolerance:
max |got - ref| <= tol * (1 + max |ref|), ref computed in fp32 from the same rounded inputs and
the float32 dequantized weight.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.quantized_dispatch import quantized_kernel  # noqa: E402
from kiln.kernels.quantized_weight import PackedWeight, QuantizedWeight, dequantize_packed, pack  # noqa: E402
from kiln.kernels.selection import selected  # noqa: E402
from kiln.kernels.triton.qgemm import QGemmConfig, qlinear_gemm  # noqa: E402
from kiln.kernels.triton.qgemv import QGemvConfig, qlinear_gemv  # noqa: E402
from kiln.kernels.triton.qgemv_dequant import GROUP_GATHER, GROUP_SPLIT, GROUP_TILE, group_mode  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
N, K = (1003, 4096) if ON_GPU else (13, 256)  # an odd N: masked weight rows
# (bits, group size, zeros): per-channel int8 (one group of K), grouped int8, int4 groups of 32/64/128
WEIGHTS = [(8, K, False), (8, 64, True), (4, 32, True), (4, 64, True), (4, 128, True)]

if not ON_GPU and not interpreting():
    pytest.skip(
        "no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True
    )


def packed_weight(n: int, k: int, bits: int, group: int, zeros: bool, dtype: torch.dtype, seed: int) -> PackedWeight:
    """Random values over the whole range, positive random scales sized for outputs of about 1,
    random integer zero points."""
    g = torch.Generator().manual_seed(seed)
    if bits == 8:
        values = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        spread, zero_range = 128.0, (-8, 9)
    else:
        values = torch.randint(0, 16, (n, k), generator=g).to(torch.int8)
        spread, zero_range = 8.0, (0, 16)
    scales = ((0.5 + torch.rand(n, k // group, generator=g)) / (spread * k**0.5)).to(dtype)
    z = torch.randint(*zero_range, (n, k // group), generator=g).to(dtype) if zeros else None
    p = pack(QuantizedWeight(values, scales, z, bits, group))
    return PackedWeight(p.qweight.to(DEVICE), p.scales.to(DEVICE), None if z is None else p.zeros.to(DEVICE), None)


def random(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)


def want(
    x: torch.Tensor,
    p: PackedWeight,
    group: int,
    bias: torch.Tensor | None = None,
    prologue: str = "none",
    norm: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference: the prologue as transformers rounds it, the fp32 product with the float32
    dequantized weight, rounded to x's dtype, then the residual."""
    if prologue == "rms_norm":
        assert norm is not None
        x = reference.rms_norm(x, norm, 1e-5)
    elif prologue == "silu_mul":
        x = reference.silu_mul(x)
    w = dequantize_packed(p.qweight, p.scales, p.zeros, None, group, torch.float32)
    out = x.float() @ w.T
    if bias is not None:
        out = out + bias.float()
    out = out.to(x.dtype)
    return out if residual is None else (residual.float() + out.float()).to(x.dtype)


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, tuple(got.shape), got.dtype)
    got, ref32 = got.float().cpu(), ref.float().cpu()
    err = (got - ref32).abs().max().item()
    limit = TOLERANCE[ref.dtype] * (1 + ref32.abs().max().item())
    assert err <= limit, f"{what}: max error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("weight", WEIGHTS, ids=lambda w: f"int{w[0]}g{w[1]}")
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_matches_the_reference(weight, rows):
    bits, group, zeros = weight
    for i, dtype in enumerate(DTYPES):
        p = packed_weight(N, K, bits, group, zeros, dtype, seed=bits + group + rows)
        x = random(rows, K, dtype=dtype, seed=rows)
        bias = random(N, dtype=dtype, seed=5) if i == 0 else None
        assert_close(qlinear_gemv(x, p.qweight, p.scales, p.zeros, group, bias), want(x, p, group, bias), str(dtype))


@pytest.mark.skipif(not ON_GPU, reason="PTX prmt runs on a GPU only (the interpreter takes shifts and masks)")
@pytest.mark.parametrize("weight", WEIGHTS, ids=lambda w: f"int{w[0]}g{w[1]}")
def test_gemv_with_prmt_matches_the_reference(weight, monkeypatch):
    from kiln.kernels.triton import qgemv

    monkeypatch.setattr(qgemv, "USE_PRMT", True)
    bits, group, zeros = weight
    for dtype in DTYPES:
        p = packed_weight(N, K, bits, group, zeros, dtype, seed=bits + group + 11)
        x = random(1, K, dtype=dtype, seed=12)
        assert_close(qlinear_gemv(x, p.qweight, p.scales, p.zeros, group), want(x, p, group, None), f"prmt {dtype}")


# block_m, block_n, block_k, split_k, warps, gather: scales per tile, whole groups per tile,
# gathered per element, split K with a last split shorter than the others, 2 and 4 rows a program
CONFIGS = [
    QGemvConfig(1, 4, 32, 1, 4),
    QGemvConfig(1, 2, 64, 1, 4),
    QGemvConfig(1, 8, 64, 1, 4, gather=True),
    QGemvConfig(1, 4, 32, 3, 4),
    QGemvConfig(2, 4, 32, 2, 4),
    QGemvConfig(4, 2, 64, 1, 4, gather=True),
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.split_k}g{c.gather:d}"
)
def test_every_gemv_variant_matches_the_reference(config):
    dtype = DTYPES[0]
    rows = min(config.block_m + 1, 4)
    x = random(rows, K, dtype=dtype, seed=3)
    for bits, group, zeros in [(8, K, False), (4, K, True), (4, 32, True), (4, 128, True)]:
        p = packed_weight(N, K, bits, group, zeros, dtype, seed=group)
        got = qlinear_gemv(x, p.qweight, p.scales, p.zeros, group, config=config)
        assert_close(got, want(x, p, group), f"int{bits} g{group}")


def test_group_modes_follow_the_tile():
    assert group_mode(64, 2048, 128) == GROUP_TILE  # a tile inside one group
    assert group_mode(512, 2048, 128) == GROUP_SPLIT  # four whole groups
    assert group_mode(512, 2048, 96) == GROUP_GATHER  # groups that do not tile
    assert group_mode(512, 2100, 128) == GROUP_GATHER  # a ragged last tile
    assert group_mode(512, 2048, 128, force_gather=True) == GROUP_GATHER


def test_float32_scales_and_symmetric_int4():
    dtype = DTYPES[0]
    x = random(1, K, dtype=dtype, seed=9)
    p = packed_weight(N, K, 4, 64, False, torch.float32, seed=4)  # no zero points: value * scale
    assert_close(qlinear_gemv(x, p.qweight, p.scales, None, 64), want(x, p, 64), "gemv")
    assert_close(qlinear_gemm(x.repeat(20, 1), p.qweight, p.scales, None, 64), want(x.repeat(20, 1), p, 64), "gemm")


@pytest.mark.parametrize("prologue", ["rms_norm", "silu_mul"])
@pytest.mark.parametrize("rows", [1, 2])
def test_gemv_prologues_and_residual(prologue, rows):
    dtype = DTYPES[0]
    width = 2 * K if prologue == "silu_mul" else K
    x = random(rows, width, dtype=dtype, seed=11, scale=2.0)
    norm = random(K, dtype=dtype, seed=12, scale=0.1) + 1 if prologue == "rms_norm" else None
    residual = random(rows, N, dtype=dtype, seed=13)
    for bits, group in [(8, K), (4, 128)]:
        p = packed_weight(N, K, bits, group, bits == 4, dtype, seed=bits)
        got = qlinear_gemv(
            x, p.qweight, p.scales, p.zeros, group, prologue=prologue, norm_weight=norm, eps=1e-5, residual=residual
        )
        assert_close(got, want(x, p, group, None, prologue, norm, residual), f"int{bits}")


def rope_tables(head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(head_dim)
    angles = torch.rand(1, head_dim // 2, generator=g) * 6.28
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("prologue", ["none", "rms_norm"])
def test_gemv_rope_and_gated_epilogues(bits, prologue):
    """One row: the rotated projection is the reference projection rotated; the gated one is its
    silu(gate) * up (within the projection's tolerance: its sums are rounded differently)."""
    dtype = DTYPES[0]
    head_dim = 64 if ON_GPU else 8
    n = 6 * head_dim if not ON_GPU else 48 * head_dim  # q, k and v heads
    group = 128 if bits == 4 else K
    p = packed_weight(n, K, bits, group, bits == 4, dtype, seed=21)
    x = random(1, K, dtype=dtype, seed=22, scale=2.0)
    norm = random(K, dtype=dtype, seed=23, scale=0.1) + 1 if prologue == "rms_norm" else None
    cos, sin = rope_tables(head_dim, dtype)
    rope_width = n * 5 // 6 // head_dim * head_dim
    args = (x, p.qweight, p.scales, p.zeros, group)
    got = qlinear_gemv(*args, prologue=prologue, norm_weight=norm, eps=1e-5, rope=(cos, sin, rope_width))
    projected = want(x, p, group, None, prologue, norm)
    assert_close(got, reference.rope(projected, cos, sin, rope_width), "rope")
    got = qlinear_gemv(*args, prologue=prologue, norm_weight=norm, eps=1e-5, gated=True, constant_weight=True)
    assert_close(got, reference.silu_mul(projected), "gated")


GEMM_CONFIGS = [None, QGemmConfig(16, 16, 32, 3, 4, 2, group_m=2), QGemmConfig(32, 16, 16, 1, 4, 2)]


@pytest.mark.parametrize("weight", WEIGHTS, ids=lambda w: f"int{w[0]}g{w[1]}")
def test_gemm_matches_the_reference(weight):
    bits, group, zeros = weight
    rows = 300 if ON_GPU else 37
    for config in GEMM_CONFIGS:
        dtype = DTYPES[-1] if config is None else DTYPES[0]
        p = packed_weight(N, K, bits, group, zeros, dtype, seed=group + bits)
        x = random(rows, K, dtype=dtype, seed=31)
        bias = random(N, dtype=dtype, seed=32)
        residual = random(rows, N, dtype=dtype, seed=33)
        got = qlinear_gemm(x, p.qweight, p.scales, p.zeros, group, bias, residual, config)
        assert_close(got, want(x, p, group, bias, residual=residual), f"{config}")


def test_dispatch_declines_what_it_does_not_run():
    dtype = DTYPES[0]
    p = packed_weight(N, K, 4, 64, True, dtype, seed=41)
    x = random(1, K, dtype=dtype, seed=42)
    common = (p.scales, p.zeros)
    assert quantized_kernel(x.float(), p.qweight, *common, None, 64, None, True, "none", None, 0.0) is None
    with selected(linear="reference"):
        assert quantized_kernel(x, p.qweight, *common, None, 64, None, True, "none", None, 0.0) is None
    got = quantized_kernel(x, p.qweight, *common, None, 64, None, True, "none", None, 0.0)
    if ON_GPU:
        assert got is not None and got.shape == (1, N)
    else:
        assert got is None  # the CPU keeps the reference path


@pytest.mark.skipif(not ON_GPU, reason="quantized_kernel runs kernels on CUDA tensors only")
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("bits", [8, 4])
def test_dispatch_runs_every_op_shape(rows, bits):
    """Through `quantized_kernel`, as the quantized ops call it: plain with bias, each prologue with
    a residual, rope and gated (fused at one row, GEMM + pass at 40 rows)."""
    dtype = torch.bfloat16
    group = 128 if bits == 4 else K
    head_dim = 128
    n = 48 * head_dim
    p = packed_weight(n, K, bits, group, bits == 4, dtype, seed=rows + bits)
    x = random(rows, K, dtype=dtype, seed=51, scale=2.0)
    gate_up = random(rows, 2 * K, dtype=dtype, seed=52, scale=2.0)
    norm = random(K, dtype=dtype, seed=53, scale=0.1) + 1
    bias = random(n, dtype=dtype, seed=54)
    residual = random(rows, n, dtype=dtype, seed=55)
    q = (p.qweight, p.scales, p.zeros, None, group)
    got = quantized_kernel(x, *q, bias, True, "none", None, 0.0)
    assert got is not None
    assert_close(got, want(x, p, group, bias), "plain")
    got = quantized_kernel(x, *q, None, True, "rms_norm", norm, 1e-5, residual=residual)
    assert got is not None
    assert_close(got, want(x, p, group, None, "rms_norm", norm, residual), "rms_norm")
    got = quantized_kernel(gate_up, *q, None, True, "silu_mul", None, 0.0, residual=residual)
    assert got is not None
    assert_close(got, want(gate_up, p, group, None, "silu_mul", residual=residual), "silu_mul")
    g = torch.Generator().manual_seed(rows)
    angles = torch.rand(rows, head_dim // 2, generator=g) * 6.28
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)
    rope_width = 40 * head_dim
    got = quantized_kernel(x, *q, None, True, "rms_norm", norm, 1e-5, rope=(cos, sin, rope_width))
    assert got is not None
    projected = want(x, p, group, None, "rms_norm", norm)
    assert_close(got, reference.rope(projected, cos, sin, rope_width), "rope")
    got = quantized_kernel(x, *q, None, True, "rms_norm", norm, 1e-5, gated=True)
    assert got is not None
    if rows > 1:
        # Many rows run the GEMM, then the silu_mul pass over its rounded output: the gated result is that
        # pass over the op's own projection (checked against the reference just above), rounding for rounding.
        # (Against the reference's separately rounded gate and up, two 1-ulp differences multiply: 2 ulps.)
        own = quantized_kernel(x, *q, None, True, "rms_norm", norm, 1e-5)
        assert own is not None
        assert_close(own, projected, "projection")
        projected = own
    assert_close(got, reference.silu_mul(projected), "gated")


@pytest.mark.skipif(not ON_GPU, reason="quantized_kernel runs kernels on CUDA tensors only")
@pytest.mark.parametrize("rows", [1, 40])
def test_dispatch_runs_act_order_weights(rows):
    """An act-order weight (perm) through the GEMV and the GEMM, with each prologue."""
    dtype = torch.bfloat16
    group = 128
    p = packed_weight(N, K, 4, group, True, dtype, seed=61 + rows)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    w = dequantize_packed(p.qweight, p.scales, p.zeros, perm, group, torch.float32)
    x = random(rows, K, dtype=dtype, seed=62, scale=2.0)
    gate_up = random(rows, 2 * K, dtype=dtype, seed=63, scale=2.0)
    norm = random(K, dtype=dtype, seed=64, scale=0.1) + 1
    cases = [("none", x, None), ("rms_norm", x, norm), ("silu_mul", gate_up, None)]
    for prologue, inputs, norm_weight in cases:
        q = (p.qweight, p.scales, p.zeros, perm, group)
        got = quantized_kernel(inputs, *q, None, True, prologue, norm_weight, 1e-5)
        assert got is not None
        if prologue == "rms_norm":
            inputs = reference.rms_norm(inputs, norm, 1e-5)
        elif prologue == "silu_mul":
            inputs = reference.silu_mul(inputs)
        assert_close(got, (inputs.float() @ w.T).to(dtype), prologue)
