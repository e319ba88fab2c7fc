"""The CPU attention's block gather (`_Group.gather`) against the per-layer `index_select` along dim 1 it replaced."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.cpu_attention import _Group
from kiln.kernels.kv_quant import as_bytes


def group(blocks: torch.Tensor) -> _Group:
    zeros = torch.zeros(1, 1, dtype=torch.int64)
    return _Group(None, blocks, 1, 1, zeros, zeros)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_gather_equals_index_select_for_every_layer(dtype):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(3, 2, 40, 16, 2, 8, generator=g).mul(50).to(dtype)  # [layers, 2, blocks, bs, Hkv, D]
    blocks = torch.randint(0, 40, (4 * 5,), generator=g)  # 4 sequences x 5 blocks, repeats and block 0 included
    blocks[-1] = 0
    picker = group(blocks)
    for layer in range(3):  # one buffer, refilled by each layer
        pages = as_bytes(cache[layer])
        assert torch.equal(picker.gather(pages), pages.index_select(1, blocks))


def test_gather_of_pages_that_are_not_contiguous():
    cache = torch.randn(2, 2, 16, 4, 2, 8).transpose(3, 4)  # a layout the row view cannot take
    blocks = torch.tensor([3, 1, 1, 15])
    assert torch.equal(group(blocks).gather(cache[1]), cache[1].index_select(1, blocks))
