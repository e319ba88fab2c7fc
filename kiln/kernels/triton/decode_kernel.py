"""The split-K decode kernel: one program per (query token, kv head, split), which can also attend to and
store this step's keys (launched by `kiln.kernels.triton.decode.decode_attention`)."""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.kv_codec import encode, round_trip
from kiln.kernels.triton.pdl import handoff
from kiln.kernels.triton.tile import (
    LOG2E,
    accumulate_values,
    attend_keys,
    find_sequence,
    first_key,
    load_keys,
    load_values,
    score_tile,
    soft_cap,
    tile_offsets,
)


@triton.jit
def _new_key_step(  # type: ignore[no-untyped-def]
    acc, m_i, l_i, q_tile, q_pos, pos, j, k_new, v_new, kv_head,
    stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
    key_cache, k_scale, v_scale,
    HEAD_DIM: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, KV: tl.constexpr,
):  # fmt: skip
    """The online-softmax step of one key held in k_new/v_new (row j) at position `pos`, rounded as
    `attend_keys` rounds a cached key (softmax weights in the value dtype before the product); a
    narrow cache's key and value as the cache will read them back (`kv_codec.round_trip`)."""
    offs_d = tl.arange(0, HEAD_DIM)
    key = tl.load(k_new + j * stride_knt + kv_head * stride_knh + offs_d * stride_knd)
    value = tl.load(v_new + j * stride_vnt + kv_head * stride_vnh + offs_d * stride_vnd)
    key = round_trip(key, k_scale, q_tile, key_cache, KV)
    value = round_trip(value, v_scale, q_tile, key_cache, KV)
    s = tl.sum(q_tile.to(tl.float32) * key.to(tl.float32)[None, :], 1)
    if SOFTCAP:
        s = soft_cap(s * scale, softcap) * LOG2E
    else:
        s = s * (scale * LOG2E)
    if SLIDING:
        s = tl.where(pos > q_pos - window, s, float("-inf"))
    m_new = tl.maximum(m_i, s)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use)
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p.to(value.dtype).to(tl.float32)[:, None] * value.to(tl.float32)[None, :]
    return acc, m_new, l_i


@triton.jit
def _attend_new_keys(  # type: ignore[no-untyped-def]
    acc, m_i, l_i, q_tile, q_pos, first_new, q_begin, new_hi, k_new, v_new, kv_head,
    stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
    key_cache, k_scale, v_scale,
    HEAD_DIM: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, KV: tl.constexpr,
):  # fmt: skip
    """Attend to rows q_begin .. new_hi - 1 of k_new/v_new (this step's keys at positions first_new ...).

    A `while` loop under the interpreter, as in `attend_keys`."""
    if INTERPRET:
        j = q_begin
        while j < new_hi:
            acc, m_i, l_i = _new_key_step(
                acc, m_i, l_i, q_tile, q_pos, first_new + (j - q_begin), j, k_new, v_new, kv_head,
                stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
                key_cache, k_scale, v_scale, HEAD_DIM, SLIDING, SOFTCAP, KV,
            )  # fmt: skip
            j += 1
    else:
        for j in range(q_begin, new_hi):
            acc, m_i, l_i = _new_key_step(
                acc, m_i, l_i, q_tile, q_pos, first_new + (j - q_begin), j, k_new, v_new, kv_head,
                stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
                key_cache, k_scale, v_scale, HEAD_DIM, SLIDING, SOFTCAP, KV,
            )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _decode_kernel(  # type: ignore[no-untyped-def]
    out,
    part_acc,  # [T, Hq, num_splits, D] fp32
    part_m,  # [T, Hq, num_splits] fp32
    part_l,
    q,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    k_new,  # [T, Hkv, D]: this step's keys (FUSE_WRITE only)
    v_new,
    slot_mapping,  # [T]: where they go (-1: nowhere)
    num_seqs,
    num_splits,
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
    stride_knt,
    stride_knh,
    stride_knd,
    stride_vnt,
    stride_vnh,
    stride_vnd,
    scale,
    softcap,
    window,
    k_scale,  # a narrow cache's scales (`kv_codec`)
    v_scale,
    NUM_Q_HEADS: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partial results for _merge_kernel
    FUSE_WRITE: tl.constexpr,  # this step's keys come from k_new/v_new, and are stored into the cache here
    EARLY: tl.constexpr,  # FUSE_WRITE only: the first key tile is read before waiting for the previous kernel
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,  # GROUP padded to a power of two, at least 16 (smallest dot)
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
    KV: tl.constexpr,  # kv_codec.PLAIN / FP8 / INT8
    PDL: tl.constexpr,  # launched with programmatic dependent launch
):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if not EARLY:
        handoff(PDL)
    seq = find_sequence(query_start_loc, token, num_seqs, 1, False)
    padding = seq == num_seqs
    safe_seq = tl.minimum(seq, num_seqs - 1)
    q_begin = tl.load(query_start_loc + safe_seq)
    q_end = tl.load(query_start_loc + safe_seq + 1)
    first_new = tl.load(seq_lens + safe_seq) - (q_end - q_begin)  # position of the sequence's first new token
    q_pos = first_new + (token - q_begin)

    k_hi = tl.where(padding, 0, q_pos + 1)
    if FUSE_WRITE:  # the cache holds the keys before this step's tokens; those come from k_new below
        k_hi = tl.where(padding, 0, first_new)
    k_lo = tl.where(padding, 0, first_key(q_pos, window, BLOCK_N, SLIDING))
    per_split = tl.cdiv(tl.cdiv(tl.maximum(k_hi - k_lo, 0), num_splits), BLOCK_N) * BLOCK_N
    split_lo = k_lo + split * per_split
    split_hi = tl.minimum(split_lo + per_split, k_hi)
    table_row = block_tables + safe_seq.to(tl.int64) * stride_table
    if EARLY:
        # Until here the program read only the step's inputs, and it reads its first key tile too
        # before waiting for the kernel before it: keys of earlier steps, which no kernel of this
        # step writes. At batch 1 with a short context that is every load but the query's.
        first_off, first_pos, first_in = tile_offsets(
            split_lo, split_hi, table_row, kv_head.to(tl.int64) * stride_head, stride_page, stride_slot,
            BLOCK_N, PAGE_SIZE,
        )  # fmt: skip
        like = tl.zeros([1], dtype=q.dtype.element_ty)  # the query's dtype, before q is read
        first_k = load_keys(key_cache, first_off, first_in, stride_dim, k_scale, like, HEAD_DIM, KV)
        first_v = load_values(value_cache, first_off, first_in, stride_dim, v_scale, like, HEAD_DIM, KV)
        handoff(PDL)

    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q_tile = tl.load(
        q + token * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )
    q_rows = tl.zeros([ROWS], dtype=tl.int32) + q_pos
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    rest_lo = split_lo
    if EARLY:  # the tile loaded before the wait (nothing when the split is empty)
        p, alpha, m_i, l_i = score_tile(
            m_i, l_i, q_tile, q_rows, q_rows, first_k, first_pos, first_in, scale, softcap, window,
            SLIDING, SOFTCAP, IEEE_DOT,
        )  # fmt: skip
        acc = accumulate_values(acc, p, alpha, first_v, IEEE_DOT)
        rest_lo = split_lo + BLOCK_N
    acc, m_i, l_i = attend_keys(
        acc,
        m_i,
        l_i,
        q_tile,
        q_rows,
        q_rows,
        rest_lo,
        split_hi,
        key_cache,
        value_cache,
        table_row,
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
    if FUSE_WRITE:
        # The last split also attends to this step's keys of the sequence up to its own token (one
        # for decode) and stores its token's key and value: no program here reads those cache slots.
        last = (split == num_splits - 1) & (seq < num_seqs)
        new_hi = tl.where(last, token + 1, q_begin)
        acc, m_i, l_i = _attend_new_keys(
            acc, m_i, l_i, q_tile, q_pos, first_new, q_begin, new_hi, k_new, v_new, kv_head,
            stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
            key_cache, k_scale, v_scale, HEAD_DIM, SLIDING, SOFTCAP, INTERPRET, KV,
        )  # fmt: skip
        slot = tl.load(slot_mapping + token).to(tl.int64)
        store = (offs_d < HEAD_DIM) & last & (slot >= 0)
        safe_slot = tl.maximum(slot, 0)
        dst = (safe_slot // PAGE_SIZE) * stride_page + (safe_slot % PAGE_SIZE) * stride_slot
        dst += kv_head.to(tl.int64) * stride_head + offs_d * stride_dim
        key = tl.load(k_new + token * stride_knt + kv_head * stride_knh + offs_d * stride_knd, mask=store)
        value = tl.load(v_new + token * stride_vnt + kv_head * stride_vnh + offs_d * stride_vnd, mask=store)
        tl.store(key_cache + dst, encode(key, k_scale, key_cache, KV), mask=store)
        tl.store(value_cache + dst, encode(value, v_scale, value_cache, KV), mask=store)
    if not SPLIT:
        result = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
            result.to(out.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:
        part = (token * NUM_Q_HEADS + head).to(tl.int64) * num_splits + split
        tl.store(part_acc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_m + part, m_i, mask=row_ok)
        tl.store(part_l + part, l_i, mask=row_ok)
