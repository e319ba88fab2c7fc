"""The small-M linears' shared launch arithmetic (`kiln.kernels.triton.gemv_launch`, `gemv_config.fill_split`):
pure host code, no kernel runs."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels.triton.gemv_config import fill_split  # noqa: E402
from kiln.kernels.triton.gemv_launch import column_tiles, k_splits, new_output  # noqa: E402


def test_k_splits_cover_the_row_with_no_empty_split():
    for length in (1, 7, 64, 100, 1024, 4097, 14336):
        for block_k in (16, 64, 256, 2048):
            for most in (1, 2, 3, 8, 64):
                split, per_split = k_splits(length, block_k, most)
                assert per_split % block_k == 0 and 1 <= split <= most, (length, block_k, most)
                assert (split - 1) * per_split < length <= split * per_split, (length, block_k, most)


def test_fill_split_doubles_until_the_sms_are_covered_or_a_split_gets_too_short():
    assert fill_split(10, 4096, 256, 4, 40) == 4  # 40 programs reach the target
    assert fill_split(1, 4096, 256, 4, 1000) == 4  # 8 splits would hold 2 tiles of 256, not 4
    assert fill_split(1, 4096, 256, 2, 1000) == 8
    assert fill_split(264, 1 << 20, 256, 4, 264) == 1  # already two programs an SM
    assert fill_split(1, 100, 256, 4, 1000) == 1


def test_column_tiles_of_plain_rotary_and_gated_outputs():
    cos = sin = torch.empty(1, 4)
    assert column_tiles(10, 4, None, False) == 3
    assert column_tiles(10, 2, (cos, sin, 4), False) == 2 + 3  # two rotated pairs, then 6 plain columns
    assert column_tiles(10, 2, None, True) == 5  # one (gate, up) pair a tile


def test_new_output_answers_empty_products_without_a_launch():
    x = torch.ones(2, 0, dtype=torch.float16)
    bias = torch.arange(3, dtype=torch.float16)
    out, done = new_output(x, 2, 3, 0, bias, False)
    assert done and torch.equal(out, bias.expand(2, 3))
    out, done = new_output(x, 2, 3, 0, None, False)
    assert done and torch.equal(out, torch.zeros(2, 3, dtype=torch.float16))
    residual = torch.randn(2, 3).half()
    out, done = new_output(x, 2, 3, 0, bias, False, residual)
    assert done and torch.equal(out, bias.expand(2, 3) + residual)
    out, done = new_output(torch.ones(0, 5), 0, 3, 5, None, False)
    assert done and out.shape == (0, 3)
    out, done = new_output(torch.ones(1, 5), 1, 8, 5, None, True)
    assert not done and out.shape == (1, 4)
