"""The kiln linear ops with a packed quantized weight: on the CPU, exactly the op on the dequantized weight."""

import pytest
import torch

import kiln.kernels  # noqa: F401  (registers the ops)
from kiln.compiler.quantize.rtn import quantize_int4, quantize_int8
from kiln.kernels.quantized_weight import pack

ops = torch.ops.kiln
G = torch.Generator().manual_seed(0)


def _weights(n: int, k: int, bits: int):
    w = torch.randn(n, k, generator=G)
    q = quantize_int8(w) if bits == 8 else quantize_int4(w, 32)
    packed = pack(q)
    quant = (packed.scales, packed.zeros, packed.perm, q.group_size)
    return packed.qweight, quant, q.dequantize(torch.float32)


@pytest.mark.parametrize("bits", [8, 4])
def test_each_op_dequantizes_its_packed_weight(bits):
    x, residual = torch.randn(3, 64, generator=G), torch.randn(3, 96, generator=G)
    qweight, quant, dense = _weights(96, 64, bits)
    torch.testing.assert_close(
        ops.linear(x, qweight, None, False, residual, *quant),
        ops.linear(x, dense, None, False, residual),
        rtol=0,
        atol=0,
    )
    gate_up = torch.randn(3, 128, generator=G)
    torch.testing.assert_close(
        ops.silu_mul_linear(gate_up, qweight, None, False, None, *quant),
        ops.silu_mul_linear(gate_up, dense),
        rtol=0,
        atol=0,
    )
    norm = torch.rand(64, generator=G)
    torch.testing.assert_close(
        ops.rms_norm_linear(x, norm, 1e-5, qweight, None, False, *quant),
        ops.rms_norm_linear(x, norm, 1e-5, dense),
        rtol=0,
        atol=0,
    )
    cos, sin = torch.randn(3, 16, generator=G), torch.randn(3, 16, generator=G)
    torch.testing.assert_close(
        ops.linear_rope(x, qweight, None, False, norm, 1e-5, cos, sin, 64, *quant),
        ops.linear_rope(x, dense, None, False, norm, 1e-5, cos, sin, 64),
        rtol=0,
        atol=0,
    )
    got = ops.linear_silu_mul(x, qweight, None, False, None, 0.0, *quant)
    assert got.shape == (3, 48)
    torch.testing.assert_close(got, ops.linear_silu_mul(x, dense, None, False, None, 0.0), rtol=0, atol=0)


def test_the_fake_output_has_the_packed_weight_s_out_features():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qweight, quant, _ = _weights(96, 64, 4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(5, 64)
        assert ops.linear(x, qweight, None, False, None, *quant).shape == (5, 96)
        assert ops.linear_silu_mul(x, qweight, None, False, None, 0.0, *quant).shape == (5, 48)


@pytest.mark.parametrize("prologue", ["none", "rms_norm", "silu_mul"])
def test_act_order_inputs_meet_the_stored_columns(prologue):
    """The kernels' act-order path: x gathered by `act_order_inputs` times the weight as stored (its columns
    in group order) is x times the weight the checkpoint means (`dequantize_packed` with perm)."""
    from kiln.kernels import reference
    from kiln.kernels.quantized_dispatch import act_order_inputs
    from kiln.kernels.quantized_weight import QuantizedWeight, dequantize_packed

    g = torch.Generator().manual_seed(7)
    n, k, group = 24, 64, 16
    values = torch.randint(0, 16, (n, k), generator=g).to(torch.int8)
    scales = torch.rand(n, k // group, generator=g) + 0.5
    zeros = torch.randint(0, 16, (n, k // group), generator=g).float()
    perm = torch.randperm(k, generator=g)
    p = pack(QuantizedWeight(values, scales, zeros, 4, group, perm=perm))
    meant = dequantize_packed(p.qweight, p.scales, p.zeros, perm, group, torch.float32)
    stored = dequantize_packed(p.qweight, p.scales, p.zeros, None, group, torch.float32)
    assert not torch.equal(meant, stored)
    x = torch.randn(3, 2 * k if prologue == "silu_mul" else k, generator=g)
    norm = torch.rand(k, generator=g) + 0.5 if prologue == "rms_norm" else None
    gathered, gathered_norm = act_order_inputs(x, perm, prologue, norm)

    def prologue_of(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if prologue == "rms_norm":
            assert weight is not None
            return reference.rms_norm(rows, weight, 1e-5)
        return reference.silu_mul(rows) if prologue == "silu_mul" else rows

    want = prologue_of(x, norm) @ meant.T
    torch.testing.assert_close(prologue_of(gathered, gathered_norm) @ stored.T, want, rtol=1e-5, atol=1e-5)
