"""FP8 weights with quantized inputs (W8A8) in the kiln linear ops: on the CPU exactly the dense op on the
fake-quantized input (after the prologue) and the dequantized weight; on a GPU with FP8, the
torch._scaled_mm path against that reference on fresh random inputs."""

import pytest
import torch

import kiln.kernels  # noqa: F401  (registers the ops)
from kiln.compiler.quantize.fp8 import quantize_fp8
from kiln.compiler.quantize.smoothquant import quantize_int8_w8a8
from kiln.kernels import reference
from kiln.kernels.activation_quant import FP8, fake_quantize, quantize_input
from kiln.kernels.quantized_weight import QuantizedWeight, pack
from kiln.kernels.w8a8_dispatch import fp8_refusal, fp8_supported

ops = torch.ops.kiln
ON_FP8_GPU = torch.cuda.is_available() and fp8_supported(torch.device("cuda"))


def _fp8(n, k, g, static, device="cpu"):
    w = torch.randn(n, k, generator=g)
    scale = torch.tensor([0.02]) if static else None
    q = quantize_fp8(w, per_channel=not static, input_scale=scale)
    packed = pack(q)
    args = (packed.scales, None, None, q.group_size, q.activations, q.input_scale)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    return packed.qweight.to(device), args, q


def test_fp8_round_trip_and_input_quantization_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g) * 3
    q = quantize_fp8(w)
    assert q.values.dtype == FP8 and q.scales.shape == (8, 1)
    assert torch.equal(q.scales[:, 0], w.abs().amax(1) / 448)
    assert torch.equal(q.dequantize(torch.float32), q.values.float() * q.scales)
    torch.testing.assert_close(q.dequantize(torch.float32), w, rtol=0.07, atol=0)  # E4M3: 3 mantissa bits
    x = torch.randn(4, 32, generator=g)
    xq, scales = quantize_input(x, "dynamic", FP8, None)
    assert torch.equal(scales[:, 0], x.abs().amax(1) / 448) and xq.float().abs().amax() == 448
    static = fake_quantize(x * 100, "static", FP8, torch.tensor([0.01]))
    assert static.abs().amax() == pytest.approx(4.48)  # clipped at 448 * scale
    int8, _ = quantize_input(x, "dynamic", torch.int8, None)
    assert int8.dtype == torch.int8 and int8.abs().amax() == 127


@pytest.mark.parametrize("static", [False, True])
def test_each_op_quantizes_its_input_after_the_prologue_on_the_cpu(static):
    g = torch.Generator().manual_seed(1)
    qweight, args, q = _fp8(96, 64, g, static)
    dense = q.dequantize(torch.float32)

    def fq(t):
        return fake_quantize(t, q.activations, FP8, q.input_scale)

    x, residual = torch.randn(3, 64, generator=g), torch.randn(3, 96, generator=g)
    exact = {"rtol": 0, "atol": 0}
    torch.testing.assert_close(
        ops.linear(x, qweight, None, False, residual, *args), residual + fq(x) @ dense.T, **exact
    )
    gate_up = torch.randn(3, 128, generator=g)
    want = fq(reference.silu_mul(gate_up)) @ dense.T
    torch.testing.assert_close(ops.silu_mul_linear(gate_up, qweight, None, False, None, *args), want, **exact)
    norm = torch.rand(64, generator=g)
    want = fq(reference.rms_norm(x, norm, 1e-6)) @ dense.T
    torch.testing.assert_close(ops.rms_norm_linear(x, norm, 1e-6, qweight, None, False, *args), want, **exact)
    got = ops.linear_silu_mul(x, qweight, None, False, norm, 1e-6, *args)
    torch.testing.assert_close(got, reference.silu_mul(want), **exact)
    assert not torch.equal(ops.linear(x, qweight, None, False, None, *args[:4]), fq(x) @ dense.T)  # weight-only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the W8A8 GEMMs run on CUDA tensors only")
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize(("kind", "static"), [("fp8", False), ("fp8", True), ("int8", False)])
def test_w8a8_gemms_match_the_reference_on_the_gpu(rows, kind, static):
    if kind == "fp8" and not ON_FP8_GPU:
        pytest.skip("torch._scaled_mm needs a GPU of compute capability 8.9+")
    g = torch.Generator().manual_seed(rows)
    if kind == "fp8":
        qweight, args, q = _fp8(512, 256, g, static, "cuda")
    else:
        q = quantize_int8_w8a8(torch.randn(512, 256, generator=g), per_channel=True, input_scale=None)
        packed = pack(q)
        qweight, args = packed.qweight.cuda(), (packed.scales.cuda(), None, None, q.group_size, "dynamic", None)
    x = torch.randn(rows, 256, generator=g).to("cuda", torch.bfloat16)
    residual = torch.randn(rows, 512, generator=g).to("cuda", torch.bfloat16)
    got = ops.linear(x, qweight, None, True, residual, *args)
    scale = None if q.input_scale is None else q.input_scale.cuda()
    fq = fake_quantize(x.float(), q.activations, q.values.dtype, scale)
    if kind == "fp8" and rows == 1:  # one row runs the FP8 GEMV, which keeps x unrounded (test_fp8_gemv.py)
        fq = x.float()
    want = residual.float() + fq @ q.dequantize(torch.float32).cuda().T
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_fp8_weights_are_checked_and_the_cpu_runs_them_emulated():
    values = torch.zeros(4, 8).to(FP8)
    scales = torch.ones(4, 1)
    with pytest.raises(ValueError, match="no zero points"):
        QuantizedWeight(values, scales, torch.zeros(4, 1), 8, 8)
    with pytest.raises(ValueError, match="static"):
        QuantizedWeight(values, scales, None, 8, 8, activations="dynamic", input_scale=torch.ones(1))
    with pytest.raises(ValueError, match="activations must be one of"):
        QuantizedWeight(values, scales, None, 8, 8, activations="per-group")
    assert fp8_refusal(torch.device("cpu")) is None
