"""Round-to-nearest quantization: the formulas, the ranges, and the error they leave."""

import pytest
import torch

from kiln.compiler.quantize.rtn import quantize_int4, quantize_int8


def test_int8_is_symmetric_per_output_channel():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_int8(w)
    assert q.bits == 8 and q.group_size == 64 and q.zeros is None
    assert tuple(q.scales.shape) == (6, 1)
    torch.testing.assert_close(q.scales[:, 0], w.abs().amax(dim=1) / 127)
    assert int(q.values.abs().max()) == 127 and int(q.values.min()) >= -127
    assert torch.equal(q.values, torch.round(w / q.scales).to(torch.int8))
    assert (q.dequantize(torch.float32) - w).abs().max() <= q.scales.max() / 2 + 1e-6


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_is_asymmetric_per_group_along_k(group_size):
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) + 0.3
    q = quantize_int4(w, group_size)
    assert q.bits == 4 and q.group_size == group_size
    assert tuple(q.scales.shape) == tuple(q.zeros.shape) == (4, 256 // group_size)
    groups = w.reshape(4, -1, group_size)
    low, high = groups.amin(dim=2).clamp(max=0), groups.amax(dim=2).clamp(min=0)
    torch.testing.assert_close(q.scales, (high - low) / 15)
    assert torch.equal(q.zeros, torch.round(-low / q.scales).clamp(0, 15))
    assert int(q.values.min()) >= 0 and int(q.values.max()) <= 15
    error = (q.dequantize(torch.float32) - w).abs().reshape(4, -1, group_size).amax(dim=2)
    assert (error <= q.scales * 0.5 + 1e-5).all()


def test_an_all_zero_row_stays_zero():
    w = torch.zeros(2, 32)
    assert torch.equal(quantize_int8(w).dequantize(torch.float32), w)
    assert torch.equal(quantize_int4(w, 32).dequantize(torch.float32), w)


def test_a_group_size_that_does_not_divide_k_is_refused():
    with pytest.raises(ValueError, match="group size 64 does not divide in_features 96"):
        quantize_int4(torch.randn(2, 96), 64)
