"""`kiln::span_attention` / `kiln::store_kv` against plain attention on contiguous keys, and T5's buckets."""

from __future__ import annotations

import pytest
import torch

import kiln.kernels  # noqa: F401
from kiln.kernels.reference import relative_bucket


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "distance"), [(32, 128), (8, 16)])
def test_relative_buckets_are_t5s(bidirectional, buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)
    expected = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
    assert torch.equal(relative_bucket(relative, bidirectional, buckets, distance), expected)


def test_self_and_cross_spans_through_scrambled_blocks():
    """Two sequences (encoder 5 and 3 positions, decoders 2 cached + 3 new and 0 + 1 new) in scrambled blocks:
    self-attention sees the decoder's own keys causally with the bias, cross-attention the encoder's."""
    g = torch.Generator().manual_seed(0)
    layers, heads, dim, bs = 2, 4, 8, 2
    encoder, cached, new = (5, 3), (2, 0), (3, 1)
    tables = torch.randperm(12, generator=g).view(2, 6).to(torch.int32)
    cache = torch.zeros(layers, 2, 12, bs, heads, dim)
    keys = [torch.randn(e + c + n, heads, dim, generator=g) for e, c, n in zip(encoder, cached, new)]
    values = [torch.randn(e + c + n, heads, dim, generator=g) for e, c, n in zip(encoder, cached, new)]

    def slots(i: int, positions: range) -> torch.Tensor:
        return torch.tensor([int(tables[i, p // bs]) * bs + p % bs for p in positions])

    for i, (e, c) in enumerate(zip(encoder, cached)):  # what earlier steps stored
        torch.ops.kiln.store_kv(cache, keys[i][: e + c], values[i][: e + c], slots(i, range(e + c)), 1)
    spans = [range(e + c, e + c + n) for e, c, n in zip(encoder, cached, new)]
    q = torch.randn(sum(new), heads, dim, generator=g)
    k_new = torch.cat([keys[i][list(s)] for i, s in enumerate(spans)])
    v_new = torch.cat([values[i][list(s)] for i, s in enumerate(spans)])
    bias = torch.randn(8, heads, generator=g)
    meta = (
        torch.cat([slots(i, s) for i, s in enumerate(spans)]),
        tables,
        torch.tensor([s.stop for s in spans], dtype=torch.int32),
        torch.tensor([0, new[0], sum(new)], dtype=torch.int32),
    )
    lens = torch.tensor(encoder, dtype=torch.int32)
    mine = torch.ops.kiln.span_attention(q, k_new, v_new, cache, *meta, lens, meta[2], 1, 0.5, True, bias, 16)
    cross = torch.ops.kiln.span_attention(
        q, None, None, cache, *meta, torch.zeros_like(lens), lens, 1, 1.0, False, None, 0
    )
    row = 0
    for i, span in enumerate(spans):
        e = encoder[i]
        for p in span:
            qi = q[row]
            own = range(e, p + 1)
            scores = torch.einsum("hd,khd->hk", qi, keys[i][list(own)]) * 0.5
            scores = scores + bias[relative_bucket(torch.tensor(own) - p, False, 8, 16)].T
            expected = torch.einsum("hk,khd->hd", scores.softmax(-1), values[i][list(own)])
            torch.testing.assert_close(mine[row], expected)
            scores = torch.einsum("hd,khd->hk", qi, keys[i][:e])
            torch.testing.assert_close(cross[row], torch.einsum("hk,khd->hd", scores.softmax(-1), values[i][:e]))
            row += 1


@pytest.mark.parametrize("causal", [True, False])
def test_decode_rows_match_the_reference(causal):
    """One query per sequence (a decoder step): the batched path against the per-sequence reference,
    grouped query heads, padded block tables, and a padding row with an empty span."""
    from kiln.kernels import reference
    from kiln.kernels.span_attention import decode_span_attention

    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, 2, 10, 4, 2, 8, generator=g)
    tables = torch.randperm(10, generator=g)[:9].view(3, 3).to(torch.int32)
    seq_lens = torch.tensor([7, 12, 1], dtype=torch.int32)
    begin = torch.tensor([3, 5, 0], dtype=torch.int32) if causal else torch.zeros(3, dtype=torch.int32)
    end = seq_lens if causal else torch.tensor([3, 5, 0], dtype=torch.int32)
    q = torch.randn(3, 4, 8, generator=g)
    bias = torch.randn(8, 4, generator=g) if causal else None
    starts = torch.arange(4, dtype=torch.int32)
    slots = torch.full((3,), -1)
    expected = reference.span_attention(
        q, None, None, cache, slots, tables, seq_lens, starts, begin, end, 1, 0.3, causal, bias, 16
    )
    mine = decode_span_attention(q, cache, tables, seq_lens, begin, end, 1, 0.3, causal, bias, 16)
    torch.testing.assert_close(mine, expected)


def test_query_bounds_narrow_each_querys_keys():
    """Per-query key bounds (Mllama's tokens reading their own images' rows): a prefill of two sequences against
    plain attention on each query's own keys (an empty span gives zeros), and a decode step through the op's
    batched path against the reference."""
    from kiln.kernels import reference

    g = torch.Generator().manual_seed(2)
    cache = torch.randn(1, 2, 8, 4, 2, 8, generator=g)
    tables = torch.randperm(8, generator=g).view(2, 4).to(torch.int32)
    encoder = torch.tensor([9, 6], dtype=torch.int32)
    q = torch.randn(5, 4, 8, generator=g)
    begin, end = torch.tensor([0, 2, 5, 0, 1]), torch.tensor([9, 5, 5, 6, 3])
    meta = (torch.full((5,), -1), tables, encoder + torch.tensor([3, 2]), torch.tensor([0, 3, 5], dtype=torch.int32))
    zero = torch.zeros_like(encoder)
    out = torch.ops.kiln.span_attention(q, None, None, cache, *meta, zero, encoder, 0, 0.5, False, None, 0, begin, end)
    keys, values = (cache[0, i][tables.long()].flatten(1, 2).repeat_interleave(2, dim=2) for i in (0, 1))
    for row, seq in enumerate([0, 0, 0, 1, 1]):
        lo, hi = int(begin[row]), int(end[row])
        scores = torch.einsum("hd,khd->hk", q[row], keys[seq, lo:hi]) * 0.5
        expected = torch.einsum("hk,khd->hd", scores.softmax(-1), values[seq, lo:hi]) if hi > lo else q[row] * 0
        torch.testing.assert_close(out[row], expected)
    step = (torch.full((2,), -1), tables, encoder + 1, torch.arange(3, dtype=torch.int32))
    begin, end = torch.tensor([3, 1]), torch.tensor([7, 4])
    mine = torch.ops.kiln.span_attention(
        q[:2], None, None, cache, *step, zero, encoder, 0, 0.5, False, None, 0, begin, end
    )
    expected = reference.span_attention(
        q[:2], None, None, cache, *step, zero, encoder, 0, 0.5, False, None, 0, begin, end
    )
    torch.testing.assert_close(mine, expected)
