"""The FP8 one-row linear (`kiln.kernels.triton.fp8_gemv`) against PyTorch on fresh random FP8 weights.

On CUDA natively (bf16 and fp16, on a GPU with FP8); without a GPU under triton's CPU interpreter
(this folder's conftest) with small shapes in fp16. Reference: the prologue as transformers
rounds it, the fp32 product with the float32 dequantized weight (values * scale), rounded to x's
dtype, then the residual. Tolerance: max |got - ref| <= tol * (1 + max |ref|).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.activation_quant import FP8, fake_quantize  # noqa: E402
from kiln.kernels.triton.fp8_gemv import fp8_linear_gemv  # noqa: E402
from kiln.kernels.triton.qgemv_config import QGemvConfig  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402
from kiln.kernels.w8a8_dispatch import fp8_supported  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
N, K = (1003, 4096) if ON_GPU else (13, 256)  # an odd N: masked weight rows

if ON_GPU and not fp8_supported(torch.device("cuda")):
    pytest.skip("FP8 needs a GPU of compute capability 8.9+", allow_module_level=True)
if not ON_GPU and not interpreting():
    pytest.skip("no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1", allow_module_level=True)


def fp8_weight(n: int, k: int, seed: int, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 values over the whole finite range (every exponent, subnormals included) and
    positive float32 scales [N, 1] sized for outputs of about 1 (one repeated scale if per_tensor)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-9, 9, (n, k), generator=g).float())
    values = values.clamp(-448, 448).to(FP8)
    scales = (0.5 + torch.rand(n, 1, generator=g)) / (values.float().abs().mean() * k**0.5)
    if per_tensor:
        scales = scales[:1].expand(n, 1).contiguous()
    return values.to(DEVICE), scales.to(DEVICE)


def random(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)


def want(x, w, s, bias=None, prologue="none", norm=None, residual=None):  # type: ignore[no-untyped-def]
    if prologue == "rms_norm":
        x = reference.rms_norm(x, norm, 1e-5)
    elif prologue == "silu_mul":
        x = reference.silu_mul(x)
    out = x.float() @ (w.float() * s.float()).T
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


# block_n, block_k, split: the default launch, split K with a last split shorter than the others
CONFIGS = [None, QGemvConfig(1, 4, 32, 3, 4)]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "split3"])
@pytest.mark.parametrize("prologue", ["none", "rms_norm", "silu_mul"])
def test_fp8_gemv_matches_the_reference(config, prologue):
    for i, dtype in enumerate(DTYPES):
        w, s = fp8_weight(N, K, seed=i, per_tensor=config is not None)
        x = random(1, 2 * K if prologue == "silu_mul" else K, dtype=dtype, seed=2)
        norm = random(K, dtype=dtype, seed=3, scale=0.1) + 1 if prologue == "rms_norm" else None
        bias, residual = random(N, dtype=dtype, seed=4), random(1, N, dtype=dtype, seed=5)
        got = fp8_linear_gemv(x, w, s, bias, config, prologue=prologue, norm_weight=norm, eps=1e-5, residual=residual)
        assert_close(got, want(x, w, s, bias, prologue, norm, residual), f"{dtype} {prologue}")


@pytest.mark.parametrize("group", [32, 64])
def test_fp8_gemv_with_block_scales(group):
    """Block-wise FP8 (a scale per row and group of columns): groups inside a tile (default launch) and
    tiles inside a group (32-byte tiles, split K)."""
    dtype = DTYPES[0]
    w, _ = fp8_weight(N, K, seed=group)
    g = torch.Generator().manual_seed(group + 1)
    s = ((0.5 + torch.rand(N, K // group, generator=g)) / (w.float().abs().mean().cpu() * K**0.5)).to(DEVICE)
    x = random(1, K, dtype=dtype, seed=group + 2)
    norm = random(K, dtype=dtype, seed=group + 3, scale=0.1) + 1
    dense = (w.float() * s.repeat_interleave(group, dim=1)).T
    ref = (reference.rms_norm(x, norm, 1e-5).float() @ dense).to(dtype)
    config = None if group == 32 else QGemvConfig(1, 4, 32, 3, 4)
    got = fp8_linear_gemv(x, w, s, None, config, prologue="rms_norm", norm_weight=norm, eps=1e-5)
    assert_close(got, ref, f"groups of {group}")


def test_fp8_gemv_rope_and_gated_epilogues():
    dtype = DTYPES[0]
    head_dim = 64 if ON_GPU else 8
    n = 48 * head_dim if ON_GPU else 6 * head_dim
    w, s = fp8_weight(n, K, seed=21)
    x = random(1, K, dtype=dtype, seed=22, scale=2.0)
    norm = random(K, dtype=dtype, seed=23, scale=0.1) + 1
    g = torch.Generator().manual_seed(head_dim)
    angles = torch.rand(1, head_dim // 2, generator=g) * 6.28
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)
    rope_width = n * 5 // 6 // head_dim * head_dim
    projected = want(x, w, s, None, "rms_norm", norm)
    got = fp8_linear_gemv(x, w, s, prologue="rms_norm", norm_weight=norm, eps=1e-5, rope=(cos, sin, rope_width))
    assert_close(got, reference.rope(projected, cos, sin, rope_width), "rope")
    got = fp8_linear_gemv(x, w, s, prologue="rms_norm", norm_weight=norm, eps=1e-5, gated=True, constant_weight=True)
    assert_close(got, reference.silu_mul(projected), "gated")


def test_x_unquantized_differs_from_the_w8a8_meaning_by_the_input_rounding():
    """The GEMV keeps x in its dtype; a W8A8 weight's many-row path rounds x to E4M3 per token
    first. Measured (interpreter, K=256): 0.16 at outputs up to 7.6 (~2%), against an own error of
    0.0 (fp16) against the unquantized-x reference."""
    dtype = DTYPES[0]
    w, s = fp8_weight(N, K, seed=31)
    x = random(1, K, dtype=dtype, seed=32)
    got = fp8_linear_gemv(x, w, s).float().cpu()
    exact = want(x, w, s).float().cpu()
    w8a8 = (fake_quantize(x.float(), "dynamic", FP8, None) @ (w.float() * s.float()).T).cpu()
    own, quantized = (got - exact).abs().max().item(), (got - w8a8).abs().max().item()
    assert own <= TOLERANCE[dtype] * (1 + exact.abs().max().item()) and quantized > 4 * own
    assert quantized <= 0.1 * (1 + w8a8.abs().max().item())  # E4M3 inputs: ~3% per element, averaged


@pytest.mark.skipif(not ON_GPU, reason="the dispatch sends CUDA tensors only")
@pytest.mark.parametrize("activations", ["none", "dynamic"])
def test_one_row_of_an_fp8_weight_goes_to_the_gemv(activations):
    from kiln.kernels.quantized_dispatch import quantized_kernel

    dtype = torch.bfloat16
    w, s = fp8_weight(N + 1, K, seed=41)
    x, norm = random(1, K, dtype=dtype, seed=42), random(K, dtype=dtype, seed=43, scale=0.1) + 1
    act = (activations, None)
    got = quantized_kernel(x, w, s, None, None, K, None, True, "rms_norm", norm, 1e-5, act, gated=True)
    assert got is not None
    assert torch.equal(got, fp8_linear_gemv(x, w, s, prologue="rms_norm", norm_weight=norm, eps=1e-5, gated=True))
    assert_close(got, reference.silu_mul(want(x, w, s, None, "rms_norm", norm)), "gated")
    if activations == "none":  # weight-only FP8 at more rows: the caller's reference path
        assert quantized_kernel(x.expand(2, K), w, s, None, None, K, None, True, "none", None, 0.0, act) is None
        blocks = s.expand(N + 1, K // 128).contiguous()  # a block-wise checkpoint's scales: groups of 128
        got = quantized_kernel(x, w, blocks, None, None, 128, None, True, "none", None, 0.0, act)
        assert got is not None and torch.equal(got, fp8_linear_gemv(x, w, blocks))
        assert_close(got, want(x, w, s), "block scales")
