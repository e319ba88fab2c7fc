"""The CPU path of kiln's paged attention: every decode row of a step in one batched SDPA call.

`kiln.kernels.reference.paged_attention` loops over sequences with a dozen small ops each, which
made a decode step at batch 8 several times slower than the model's own matmuls on a 2-core CPU.
Here the keys and values of all one-token rows are gathered through their block tables at once
(`index_select` of whole blocks), and a single `scaled_dot_product_attention` call attends for all
of them, the grouped query heads of one KV head taken as extra query rows (no key copy per group).
Rows with several new tokens (prompt chunks) run one SDPA call per sequence. Masks give the
causal bound (or `attend_end`) and the sliding window. Soft-capped logits (Gemma 2) keep the
reference, which SDPA cannot express. Same layouts and meaning as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels import reference


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """`reference.write_kv`, in one indexed copy per plane when no token is skipped (a CPU can check)."""
    if slot_mapping.numel() == 0:
        return
    if int(slot_mapping.min()) < 0:
        reference.write_kv(kv_cache, layer, k, v, slot_mapping)
        return
    for plane, new in ((0, k), (1, v)):
        kv_cache[layer, plane].flatten(0, 1).index_copy_(0, slot_mapping, new.to(kv_cache.dtype))


def _gather(pages: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[B, blocks * block_size, heads, dim]: the pages of each row's block table, in order."""
    rows, blocks = tables.shape
    picked = pages.index_select(0, tables.reshape(-1).long())
    return picked.view(rows, blocks * pages.shape[1], *pages.shape[2:])


def _attend(
    q: torch.Tensor,  # [B, Tq, Hq, D]
    keys: torch.Tensor,  # [B, L, Hkv, D]
    values: torch.Tensor,  # [B, L, Hkv, Dv]
    q_positions: torch.Tensor,  # [B, Tq]
    limits: torch.Tensor,  # [B, Tq]: exclusive key-position bound per query
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    """[B * Tq, Hq, Dv]: SDPA over the gathered keys, each KV head's query heads as extra query rows."""
    batch, tq, hq, d = q.shape
    hkv = keys.shape[2]
    group = hq // hkv
    k_positions = torch.arange(keys.shape[1])
    allowed = k_positions < limits[..., None]  # [B, Tq, L]
    if sliding_window > 0:
        allowed = allowed & (k_positions > q_positions[..., None] - sliding_window)
    # query rows (kv head, group member, token) share their kv head's keys: no repeat of the keys
    rows = q.view(batch, tq, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(batch, hkv, group * tq, d)
    mask = allowed[:, None, None].expand(batch, 1, group, tq, keys.shape[1]).reshape(batch, 1, group * tq, -1)
    out = F.scaled_dot_product_attention(
        rows, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, Hkv, G * Tq, Dv]
    dv = out.shape[-1]
    return out.view(batch, hkv, group, tq, dv).permute(0, 3, 1, 2, 4).reshape(batch * tq, hq, dv)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    attend_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference.paged_attention` for CPU tensors (see the module's docstring)."""
    if softcap > 0.0:
        return reference.paged_attention(
            q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, layer, scale,
            sliding_window, softcap, attend_end,
        )  # fmt: skip
    write_kv(kv_cache, layer, k, v, slot_mapping)
    block_size = kv_cache.shape[3]
    key_pages, value_pages = kv_cache[layer, 0], kv_cache[layer, 1]
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    counts = [starts[i + 1] - starts[i] for i in range(len(lengths))]
    decode = [i for i, n in enumerate(counts) if n == 1]
    if len(decode) == len(lengths) == q.shape[0]:  # a decode step: row i is sequence i
        return _decode_rows(q, key_pages, value_pages, block_tables, seq_lens, lengths, scale, sliding_window,
                            attend_end)  # fmt: skip
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])  # rows of no sequence stay zero, as in the reference
    if decode:
        index = torch.tensor([starts[i] for i in decode])
        seqs = torch.tensor(decode)
        ends = None if attend_end is None else attend_end.index_select(0, index)
        got = _decode_rows(
            q.index_select(0, index), key_pages, value_pages, block_tables.index_select(0, seqs),
            seq_lens.index_select(0, seqs), [lengths[i] for i in decode], scale, sliding_window, ends,
        )  # fmt: skip
        out.index_copy_(0, index, got)
    for i, (context_len, num_new) in enumerate(zip(lengths, counts)):
        if num_new < 2:
            continue
        begin, end = starts[i], starts[i + 1]
        num_blocks = -(-context_len // block_size)
        table = block_tables[i : i + 1, :num_blocks]
        keys = _gather(key_pages, table)[:, :context_len]
        values = _gather(value_pages, table)[:, :context_len]
        positions = torch.arange(context_len - num_new, context_len)[None]
        limits = positions + 1 if attend_end is None else attend_end[None, begin:end]
        out[begin:end] = _attend(q[None, begin:end], keys, values, positions, limits, scale, sliding_window)
    return out


def _decode_rows(
    q: torch.Tensor,  # [B, Hq, D]: one query per sequence
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    block_tables: torch.Tensor,  # [B, width]
    seq_lens: torch.Tensor,  # [B]
    lengths: list[int],
    scale: float,
    sliding_window: int,
    attend_end: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of B one-token rows, each the last token of its sequence, in one SDPA call."""
    block_size = key_pages.shape[1]
    num_blocks = -(-max(lengths) // block_size)
    tables = block_tables[:, :num_blocks]
    keys, values = _gather(key_pages, tables), _gather(value_pages, tables)
    positions = (seq_lens.long() - 1)[:, None]
    limits = positions + 1 if attend_end is None else attend_end[:, None].long()
    return _attend(q[:, None], keys, values, positions, limits, scale, sliding_window)
