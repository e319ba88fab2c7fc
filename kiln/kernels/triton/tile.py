"""Device helpers shared by kiln's Triton attention kernels.

`find_sequence` maps a program to its sequence by searching `query_start_loc` on the device, so
no kernel needs the per-sequence token counts on the host. `attend_keys` runs the online-softmax
loop of one tile of query rows over a range of key positions read through a block table.

Scores live in the log2 domain (multiplied by log2(e)) so the loop uses `exp2`; the running
maximum `m`, the running sum `l` and the unnormalised accumulator `acc` are fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.kv_codec import decode

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def find_sequence(query_start_loc, index, num_seqs, BLOCK_Q: tl.constexpr, PER_SEQ_PAD: tl.constexpr):  # type: ignore[no-untyped-def]
    """Largest i in [0, num_seqs] with key(i) <= index, by binary search over query_start_loc.

    key(i) = query_start_loc[i] // BLOCK_Q (+ i when PER_SEQ_PAD): with the padding, sequence i
    owns program indices key(i) .. key(i + 1) - 1, which is at least cdiv(its tokens, BLOCK_Q)
    tiles. i == num_seqs means the index is past the last sequence (padding tokens).
    """
    lo = index * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        key = tl.load(query_start_loc + mid) // BLOCK_Q
        if PER_SEQ_PAD:
            key += mid
        ok = key <= index
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def soft_cap(s, cap):  # type: ignore[no-untyped-def]
    """cap * tanh(s / cap), with tanh written through exp2 (saturates cleanly at +-1)."""
    e = tl.exp2((2.0 * LOG2E / cap) * s)
    return cap - (2.0 * cap) / (e + 1.0)


@triton.jit
def tile_offsets(  # type: ignore[no-untyped-def]
    start, k_hi, table_row, head_off, stride_page, stride_slot, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr
):
    """Cache offsets (through the block table) of the keys at positions start .. start + BLOCK_N - 1,
    their positions, and which of them exist (< k_hi)."""
    k_pos = start + tl.arange(0, BLOCK_N)
    in_range = k_pos < k_hi
    page = tl.load(table_row + k_pos // PAGE_SIZE, mask=in_range, other=0).to(tl.int64)
    key_off = page * stride_page + (k_pos % PAGE_SIZE).to(tl.int64) * stride_slot + head_off
    return key_off, k_pos, in_range


@triton.jit
def load_keys(key_cache, key_off, in_range, stride_dim, k_scale, q, HEAD_DIM: tl.constexpr, KV: tl.constexpr):  # type: ignore[no-untyped-def]
    """Keys [HEAD_DIM, BLOCK_N] at `tile_offsets` in q's dtype (`kv_codec.decode`), zeros where they do not exist."""
    offs_d = tl.arange(0, HEAD_DIM)
    raw = tl.load(key_cache + key_off[None, :] + offs_d[:, None] * stride_dim, mask=in_range[None, :], other=0)
    return decode(raw, k_scale, q, KV)


@triton.jit
def load_values(value_cache, key_off, in_range, stride_dim, v_scale, q, HEAD_DIM: tl.constexpr, KV: tl.constexpr):  # type: ignore[no-untyped-def]
    """Values [BLOCK_N, HEAD_DIM] at `tile_offsets` in q's dtype, zeros where they do not exist."""
    offs_d = tl.arange(0, HEAD_DIM)
    raw = tl.load(value_cache + key_off[:, None] + offs_d[None, :] * stride_dim, mask=in_range[:, None], other=0)
    return decode(raw, v_scale, q, KV)


@triton.jit
def score_tile(  # type: ignore[no-untyped-def]
    m_i, l_i, q, q_pos, q_last, k, k_pos, in_range, scale, softcap, window,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr,
):  # fmt: skip
    """The online softmax's first half for one key tile: (weights p, rescale alpha, new max, new sum).

    q_last: the last key position each row may see (its own position when causal); the sliding
    window still counts back from q_pos."""
    if IEEE_DOT:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if SOFTCAP:
        s = soft_cap(s * scale, softcap) * LOG2E
    else:
        s = s * (scale * LOG2E)
    allowed = (k_pos[None, :] <= q_last[:, None]) & in_range[None, :]
    if SLIDING:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def accumulate_values(acc, p, alpha, v, IEEE_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    """The online softmax's second half: acc * alpha + p @ v (p rounded to the values' dtype)."""
    if IEEE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return acc * alpha[:, None] + pv


@triton.jit
def _key_tile(  # type: ignore[no-untyped-def]
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    q_last,
    start,
    k_hi,
    key_cache,
    value_cache,
    table_row,
    head_off,
    stride_page,
    stride_slot,
    stride_dim,
    scale,
    softcap,
    window,
    k_scale,
    v_scale,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    KV: tl.constexpr,
):
    """One step of the online softmax: the keys at positions start .. start + BLOCK_N - 1 (the
    values are loaded once the scores are computed)."""
    key_off, k_pos, in_range = tile_offsets(
        start, k_hi, table_row, head_off, stride_page, stride_slot, BLOCK_N, PAGE_SIZE
    )
    k = load_keys(key_cache, key_off, in_range, stride_dim, k_scale, q, HEAD_DIM, KV)
    p, alpha, m_new, l_i = score_tile(
        m_i, l_i, q, q_pos, q_last, k, k_pos, in_range, scale, softcap, window, SLIDING, SOFTCAP, IEEE_DOT
    )  # fmt: skip
    v = load_values(value_cache, key_off, in_range, stride_dim, v_scale, q, HEAD_DIM, KV)
    return accumulate_values(acc, p, alpha, v, IEEE_DOT), m_new, l_i


@triton.jit
def attend_keys(  # type: ignore[no-untyped-def]
    acc,  # [BLOCK_M, HEAD_DIM] fp32, unnormalised
    m_i,  # [BLOCK_M] fp32, running max (log2 domain)
    l_i,  # [BLOCK_M] fp32, running sum
    q,  # [BLOCK_M, HEAD_DIM], the query's dtype (a plain cache's too)
    q_pos,  # [BLOCK_M] int32, absolute position of each query row
    q_last,  # [BLOCK_M] int32, last key position each row may see (q_pos when causal)
    k_lo,  # first key position to visit (a multiple of BLOCK_N)
    k_hi,  # one past the last key position to visit
    key_cache,  # pointer to this layer's key pages [num_blocks, PAGE_SIZE, Hkv, D]
    value_cache,
    table_row,  # pointer to this sequence's row of block_tables
    kv_head,
    stride_page,
    stride_slot,
    stride_head,
    stride_dim,
    scale,
    softcap,
    window,
    k_scale,  # a narrow cache's scales (`kv_codec`; unused when KV is PLAIN)
    v_scale,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
    KV: tl.constexpr,  # kv_codec.PLAIN / FP8 / INT8
):
    """Online softmax of the rows of q over key positions [k_lo, k_hi), one BLOCK_N tile at a time.

    Compiled, a `for` loop (Triton software-pipelines it). Under the interpreter a `while` loop:
    triton 3.6's interpreter turns a tensor loop bound into an int with int(ndarray of shape
    (1,)), which NumPy >= 2.4 rejects.
    """
    head_off = kv_head.to(tl.int64) * stride_head
    if INTERPRET:
        start = k_lo
        while start < k_hi:
            acc, m_i, l_i = _key_tile(
                acc, m_i, l_i, q, q_pos, q_last, start, k_hi, key_cache, value_cache, table_row, head_off,
                stride_page, stride_slot, stride_dim, scale, softcap, window, k_scale, v_scale,
                BLOCK_N, HEAD_DIM, PAGE_SIZE, SLIDING, SOFTCAP, IEEE_DOT, KV,
            )  # fmt: skip
            start += BLOCK_N
    else:
        for start in range(k_lo, k_hi, BLOCK_N):
            acc, m_i, l_i = _key_tile(
                acc, m_i, l_i, q, q_pos, q_last, start, k_hi, key_cache, value_cache, table_row, head_off,
                stride_page, stride_slot, stride_dim, scale, softcap, window, k_scale, v_scale,
                BLOCK_N, HEAD_DIM, PAGE_SIZE, SLIDING, SOFTCAP, IEEE_DOT, KV,
            )  # fmt: skip
    return acc, m_i, l_i


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def first_key(q_pos_first, window, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):  # type: ignore[no-untyped-def]
    """First key position a tile whose earliest query sits at q_pos_first must visit (BLOCK_N-aligned)."""
    if SLIDING:
        lo = tl.maximum(q_pos_first - window + 1, 0)
        return (lo // BLOCK_N) * BLOCK_N
    else:
        return q_pos_first * 0
