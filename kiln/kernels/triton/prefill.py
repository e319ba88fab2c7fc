"""Triton kernel: paged attention for packed sequences with any number of new tokens each.

Covers prefill, chunked prefill over a cached prefix and decode rows in one launch (the new
keys must already be in the cache). A program handles one tile of BLOCK_Q consecutive query
tokens of one sequence and one kv head; its BLOCK_M = BLOCK_Q * GROUP_PAD rows are those tokens
times the GROUP query heads that share the kv head, so each key tile is read once per group.

The grid is (num_tokens // BLOCK_Q + num_seqs + 1, Hkv), sized from shapes only. Sequence i
owns tiles qsl[i] // BLOCK_Q + i onwards (see `tile.find_sequence`), which the program finds
by binary search on the device; spare tiles return at once. Tiles run last-first, so those
with the longest key ranges start first. The extra "sequence" num_seqs
covers tokens past query_start_loc[-1] (padding), whose rows are written as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels.triton.kv_codec import kernel_view, kind
from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import handoff, launch_options
from kiln.kernels.triton.tile import attend_keys, find_sequence, first_key, interpreting


@triton.jit
def _prefill_kernel(  # type: ignore[no-untyped-def]
    out,
    q,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    attend_end,  # [num_tokens] per-query exclusive key bound (read only when LIMITS)
    num_seqs,
    num_tokens,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_table,
    stride_page,
    stride_slot,
    stride_head,
    stride_dim,
    scale,
    softcap,
    window,
    k_scale,  # a narrow cache's scales (`kv_codec`)
    v_scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    LIMITS: tl.constexpr,  # attend_end replaces the causal bound
    IEEE_DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
    KV: tl.constexpr,  # kv_codec.PLAIN / FP8 / INT8
    PDL: tl.constexpr,  # launched with programmatic dependent launch
):
    handoff(PDL)
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # last tiles (longest key ranges) first
    kv_head = tl.program_id(1)
    seq = find_sequence(query_start_loc, tile, num_seqs, BLOCK_Q, True)
    padding = seq == num_seqs
    q_begin = tl.load(query_start_loc + seq)
    q_end = tl.load(query_start_loc + tl.minimum(seq + 1, num_seqs))
    q_end = tl.where(padding, num_tokens, q_end)
    tok0 = q_begin + (tile - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if tok0 >= q_end:
        return
    safe_seq = tl.minimum(seq, num_seqs - 1)
    context = tl.where(padding, 0, tl.load(seq_lens + safe_seq))
    first_pos = context - (q_end - q_begin)  # absolute position of the sequence's first new token

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = tok0 + offs_m // GROUP_PAD
    group_idx = offs_m % GROUP_PAD
    head = kv_head * GROUP + group_idx
    row_ok = (tok < q_end) & (group_idx < GROUP)
    q_pos = first_pos + (tok - q_begin)

    if LIMITS:
        limit = tl.load(attend_end + tok, mask=row_ok, other=0).to(tl.int32)
        q_last = limit - 1
        k_hi = tl.minimum(tl.max(limit, 0), context)
    else:
        q_last = q_pos
        last_tok = tl.minimum(tok0 + BLOCK_Q, q_end) - 1
        k_hi = tl.where(padding, 0, first_pos + (last_tok - q_begin) + 1)
    k_lo = first_key(first_pos + (tok0 - q_begin), window, BLOCK_N, SLIDING)

    q_tile = tl.load(
        q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_keys(
        acc,
        m_i,
        l_i,
        q_tile,
        q_pos,
        q_last,
        k_lo,
        k_hi,
        key_cache,
        value_cache,
        block_tables + safe_seq.to(tl.int64) * stride_table,
        kv_head,
        stride_page,
        stride_slot,
        stride_head,
        stride_dim,
        scale,
        softcap,
        window,
        k_scale,
        v_scale,
        BLOCK_N,
        HEAD_DIM,
        PAGE_SIZE,
        SLIDING,
        SOFTCAP,
        IEEE_DOT,
        INTERPRET,
        KV,
    )
    result = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
        result.to(out.dtype.element_ty),
        mask=row_ok[:, None],
    )


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape and launch options: BLOCK_M query rows (tokens x padded group) by BLOCK_N keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_config(num_tokens: int, num_seqs: int, group_pad: int, head_dim: int) -> PrefillConfig:
    """From shapes only. Few tokens per sequence (decode rows in a mixed batch): fewer rows per
    tile, so that a one-token sequence does not fill a whole tile with padding.

    64 x 64 tiles, 4 warps, 2 stages were the fastest or within 10% of it for head_dim 128 bf16 on
    an H100 (1 x 2048 and 8 x 512 prompts, 32/8 heads; benchmarks/attention_kernels.py --sweep)."""
    tokens_per_seq = triton.next_power_of_2(max(1, triton.cdiv(num_tokens, max(num_seqs, 1))))
    block_m = max(16, min(tokens_per_seq * group_pad, max(64, group_pad)))
    num_warps = 8 if block_m * head_dim >= 128 * 128 else 4
    return PrefillConfig(block_m, 64 if head_dim <= 128 else 32, num_warps, 2)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    out: torch.Tensor,
    config: PrefillConfig | None = None,
    attend_end: torch.Tensor | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Attend every query of q [T, Hq, D] to its sequence's cached keys; writes and returns out.

    config overrides the shape-based tile choice (benchmarks, tests). attend_end [T], when given,
    replaces the causal bound: query i sees keys at positions < attend_end[i] (all in the cache).
    kv_scales: a narrow (FP8 / int8) cache's (k_scale, v_scale) for this layer (`kv_codec`)."""
    num_tokens, num_q_heads, head_dim = q.shape
    key_cache, value_cache = kv_cache[layer, 0], kv_cache[layer, 1]
    num_kv_heads = key_cache.shape[2]
    num_seqs = block_tables.shape[0]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    config = config or default_config(num_tokens, num_seqs, group_pad, head_dim)
    assert config.block_m % group_pad == 0, f"BLOCK_M {config.block_m} must hold whole groups of {group_pad} rows"
    block_q = config.block_m // group_pad
    grid = (num_tokens // block_q + num_seqs + 1, num_kv_heads)
    pdl = pdl_enabled(q.device)
    _prefill_kernel[grid](
        out,
        q,
        kernel_view(key_cache),
        kernel_view(value_cache),
        block_tables,
        seq_lens,
        query_start_loc,
        query_start_loc if attend_end is None else attend_end,
        num_seqs,
        num_tokens,
        *q.stride(),
        *out.stride(),
        block_tables.stride(0),
        *key_cache.stride(),
        scale,
        softcap,
        sliding_window,
        float(kv_scales[0]),
        float(kv_scales[1]),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        HEAD_DIM=head_dim,
        PAGE_SIZE=key_cache.shape[1],
        SLIDING=sliding_window > 0,
        SOFTCAP=softcap > 0.0,
        LIMITS=attend_end is not None,
        IEEE_DOT=q.dtype == torch.float32,
        INTERPRET=interpreting(),
        KV=kind(key_cache.dtype),
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(pdl),
    )
    return out
