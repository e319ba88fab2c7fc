"""The unpacked/packed forms of a quantized weight agree with their documented meaning."""

import pytest
import torch

from kiln.kernels.quantized_weight import QuantizedWeight, dequantize_packed, pack, pack_int4, unpack_int4


def test_int4_pack_round_trips_and_places_halves_in_nibbles():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (6, 10), generator=g, dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 5)
    assert torch.equal(unpack_int4(packed), values)
    assert torch.equal((packed[:, 1] & 0x0F).to(torch.int8), values[:, 1])
    assert torch.equal((packed[:, 1] >> 4).to(torch.int8), values[:, 6])


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_follows_the_formula_with_groups_zeros_and_perm(bits):
    g = torch.Generator().manual_seed(1)
    n, k, group = 5, 16, 4
    low, high = (0, 16) if bits == 4 else (-128, 128)
    values = torch.randint(low, high, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, k // group, generator=g) + 0.1
    zeros = torch.randint(0, 16, (n, k // group), generator=g).float() if bits == 4 else None
    perm = torch.randperm(k, generator=g)
    weight = QuantizedWeight(values, scales, zeros, bits, group, perm)
    dense = weight.dequantize()
    for n_i in range(n):
        for j in range(k):
            z = 0.0 if zeros is None else zeros[n_i, j // group]
            expected = (values[n_i, j].item() - z) * scales[n_i, j // group]
            assert dense[n_i, perm[j]].item() == pytest.approx(float(expected), rel=1e-6)
    x = torch.randn(3, k, generator=g)
    packed = pack(QuantizedWeight(values, scales, zeros, bits, group))
    stored = dequantize_packed(packed.qweight, packed.scales, packed.zeros, None, group)
    torch.testing.assert_close(x @ dense.T, x[:, perm] @ stored.T)


def test_shapes_are_checked():
    values = torch.zeros(4, 12, dtype=torch.int8)
    with pytest.raises(ValueError, match="does not divide"):
        QuantizedWeight(values, torch.ones(4, 2), None, 8, 5)
    with pytest.raises(ValueError, match="scales must be"):
        QuantizedWeight(values, torch.ones(4, 2), None, 8, 4)
