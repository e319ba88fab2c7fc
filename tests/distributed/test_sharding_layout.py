"""How a tensor-parallel build splits heads, vocabulary and int8 scales, and the splits it refuses (no build)."""

from __future__ import annotations

import pytest
import torch

from kiln.compiler.quantize.rtn import quantize_int8
from kiln.compiler.sharding.layout import HeadSplit, check_tp, head_split, vocab_rows
from kiln.compiler.sharding.quantize import row_parallel_int8
from kiln.compiler.sharding.shard import Slice
from kiln.errors import KilnError


def test_heads_split_or_replicate() -> None:
    assert head_split(1, 2, num_heads=8, num_kv_heads=4) == HeadSplit(4, 4, 2, 2)
    # one KV head per two ranks: each rank reads the KV head of its query heads
    assert [head_split(r, 4, 8, 2) for r in range(4)] == [
        HeadSplit(0, 2, 0, 1),
        HeadSplit(2, 2, 0, 1),
        HeadSplit(4, 2, 1, 1),
        HeadSplit(6, 2, 1, 1),
    ]


def test_vocab_rows_pad_the_last_rank() -> None:
    assert [vocab_rows(r, 3, 10) for r in range(3)] == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]


@pytest.mark.parametrize(
    "tp, heads, kv, mlp, message",
    [
        (3, 4, 2, 129, "4 attention heads do not divide over 3 ranks"),
        (4, 8, 6, 128, "6 KV heads do not divide over 4 ranks"),
        (4, 12, 3, 128, "4 ranks do not divide over 3 KV heads"),
        (2, 4, 2, 127, "the MLP width 127 does not divide over 2 ranks"),
    ],
)
def test_splits_that_do_not_divide_are_refused(tp: int, heads: int, kv: int, mlp: int, message: str) -> None:
    with pytest.raises(KilnError, match=message):
        check_tp(tp, heads, kv, mlp, "ckpt")


def test_row_parallel_int8_uses_whole_row_scales() -> None:
    weight = torch.randn(6, 8)
    weight[0, 6] = 9.0  # the largest |w| of row 0 lies in rank 1's columns
    whole = quantize_int8(weight)
    for rank in range(2):
        piece = Slice("w", 1, rank * 4, rank * 4 + 4, 4)
        shard = weight[:, piece.start : piece.stop]
        read = lambda s: weight[:, s.start : s.stop]  # noqa: E731
        got = row_parallel_int8({"w": shard}, {"w": piece}, 2, read).weights["w"]
        assert torch.equal(got.scales, whole.scales)
        assert torch.equal(got.values, whole.values[:, piece.start : piece.stop])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"quantization": "fp8"}, "--quantization fp8 is built with --tp-size 1 only"),
        ({"quantization": "int4_awq", "calib_data": "notes.txt"}, "--quantization int4_awq is built with --tp-size 1"),
        ({"kv_cache_dtype": "fp8"}, r"a narrow KV cache \(--kv-cache-dtype\) is built with --tp-size 1 only"),
    ],
)
def test_what_a_sharded_build_does_not_do_is_refused(tmp_path, options, message) -> None:
    from kiln.compiler.sharding.build import check_sharded_request
    from kiln.config import BuildConfig
    from tests.tiny_checkpoints import make_checkpoint

    make_checkpoint("llama", tmp_path)
    with pytest.raises(KilnError, match=message):
        check_sharded_request(tmp_path, BuildConfig(tp_size=2, **options))
