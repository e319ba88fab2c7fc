"""`kiln::span_attention` and `kiln::store_kv`: the paged attention of encoder-decoder models.

An encoder-decoder request's cache blocks hold, in every decoder layer, the cross-attention keys and
values of its encoder output at positions [0, encoder length), then its decoder's own keys and
values. The encoder program stores the first part once (`store_kv`); each decoder step attends over
one span of positions per sequence: the decoder's own (causal, with T5's relative bias when given)
or the encoder's (cross-attention), which `query_begin`/`query_end` may narrow per query (Mllama's tokens
read the rows of their own images). Both mutate `kv_cache` in place. The implementation is the
PyTorch reference (`kiln.kernels.reference.span_attention`) on every device, except for decode
steps (one query per sequence, known from the shapes alone): `decode_span_attention` attends for
every row at once over its padded block table, with no host synchronisation and static shapes, as a
captured CUDA graph needs.
"""

from __future__ import annotations

import torch

from kiln.kernels import reference


@torch.library.custom_op("kiln::span_attention", mutates_args=("kv_cache",))
def span_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    key_begin: torch.Tensor,
    key_end: torch.Tensor,
    layer: int,
    scale: float,
    causal: bool,
    bias: torch.Tensor | None,
    max_distance: int,
    query_begin: torch.Tensor | None = None,
    query_end: torch.Tensor | None = None,
) -> torch.Tensor:
    if q.shape[0] == seq_lens.shape[0]:  # every sequence of a decoder step has a token: one each
        if k is not None and v is not None:
            reference.write_kv(kv_cache, layer, k, v, slot_mapping)
        if query_begin is not None and query_end is not None:  # one query a sequence: its bounds are the sequence's
            key_begin, key_end = torch.maximum(key_begin, query_begin), torch.minimum(key_end, query_end)
        return decode_span_attention(
            q, kv_cache, block_tables, seq_lens, key_begin, key_end, layer, scale, causal, bias, max_distance
        )
    return reference.span_attention(
        q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, key_begin, key_end,
        layer, scale, causal, bias, max_distance, query_begin, query_end,
    )  # fmt: skip


def decode_span_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    key_begin: torch.Tensor,
    key_end: torch.Tensor,
    layer: int,
    scale: float,
    causal: bool,
    bias: torch.Tensor | None,
    max_distance: int,
) -> torch.Tensor:
    """`reference.span_attention` for one query per sequence (row i at position seq_lens[i] - 1), every row
    at once: keys gathered through the whole (padded) block table, masked to [key_begin, key_end)."""
    picked = kv_cache[layer][:, block_tables.long()].flatten(2, 3)  # [2, B, L, Hkv, D]
    k_positions = torch.arange(picked.shape[2], device=q.device)[None, :]
    q_positions = (seq_lens.long() - 1)[:, None]
    allowed = (k_positions >= key_begin.long()[:, None]) & (k_positions < key_end.long()[:, None])
    if causal:
        allowed = allowed & (k_positions <= q_positions)
    # a padding row has no allowed key: it attends to nothing
    return reference.span_softmax(
        q[:, None], picked[0], picked[1], q_positions, k_positions, allowed[:, None, :], scale, bias, max_distance
    )[:, 0]


@span_attention.register_fake
def _span_attention_fake(  # type: ignore[no-untyped-def]
    q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, key_begin, key_end,
    layer, scale, causal, bias, max_distance, query_begin=None, query_end=None,
):  # fmt: skip
    return q.new_empty(q.shape[0], q.shape[1], kv_cache.shape[-1])


@torch.library.custom_op("kiln::store_kv", mutates_args=("kv_cache",))
def store_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, layer: int) -> None:
    """Write keys/values [T, heads, head_dim] at their slots of layer `layer` (negative slots skipped)."""
    reference.write_kv(kv_cache, layer, k, v, slot_mapping)


@store_kv.register_fake
def _store_kv_fake(kv_cache, k, v, slot_mapping, layer):  # type: ignore[no-untyped-def]
    return None
