"""Triton kernels: paged attention with one program per query token, split over key length.

Flash-decoding: programs are (token, kv head, split). Each split attends the token's group of
query heads to an equal share of its key range and leaves an unnormalised partial result with
its running max and sum; a second kernel merges the splits. The number of splits comes from
shapes only (tokens, kv heads, block-table width), so the launch is the same for every step
of a CUDA graph; each program derives its own key range from seq_lens on the device.

Every token finds its sequence by binary search on query_start_loc, so the kernels are correct
for any batch (several or zero new tokens per sequence, padding tokens) although they are meant
for decode, where each sequence has exactly one new token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import handoff, launch_options
from kiln.kernels.triton.tile import (
    LOG2E,
    accumulate_values,
    attend_keys,
    find_sequence,
    first_key,
    interpreting,
    load_keys,
    load_values,
    score_tile,
    soft_cap,
    tile_offsets,
)

MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64
PREFETCH_BYTES = 16 << 20  # at most this much of the next weight goes to L2 (of the H100's 50 MB)


@dataclass(frozen=True)
class DecodeConfig:
    """Keys per loop step and launch options of the split kernel."""

    block_n: int
    num_warps: int
    num_stages: int


def default_config(head_dim: int) -> DecodeConfig:
    return DecodeConfig(64 if head_dim <= 128 else 32, 4, 2)


@triton.jit
def _new_key_step(  # type: ignore[no-untyped-def]
    acc, m_i, l_i, q_tile, q_pos, pos, j, k_new, v_new, kv_head,
    stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
    HEAD_DIM: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """The online-softmax step of one key held in k_new/v_new (row j) at position `pos`, rounded as
    `attend_keys` rounds a cached key (softmax weights in the value dtype before the product)."""
    offs_d = tl.arange(0, HEAD_DIM)
    key = tl.load(k_new + j * stride_knt + kv_head * stride_knh + offs_d * stride_knd).to(q_tile.dtype)
    value = tl.load(v_new + j * stride_vnt + kv_head * stride_vnh + offs_d * stride_vnd).to(q_tile.dtype)
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
    HEAD_DIM: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Attend to rows q_begin .. new_hi - 1 of k_new/v_new (this step's keys at positions first_new ...).

    A `while` loop under the interpreter, as in `attend_keys`."""
    if INTERPRET:
        j = q_begin
        while j < new_hi:
            acc, m_i, l_i = _new_key_step(
                acc, m_i, l_i, q_tile, q_pos, first_new + (j - q_begin), j, k_new, v_new, kv_head,
                stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
                HEAD_DIM, SLIDING, SOFTCAP,
            )  # fmt: skip
            j += 1
    else:
        for j in range(q_begin, new_hi):
            acc, m_i, l_i = _new_key_step(
                acc, m_i, l_i, q_tile, q_pos, first_new + (j - q_begin), j, k_new, v_new, kv_head,
                stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
                HEAD_DIM, SLIDING, SOFTCAP,
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
        first_k = load_keys(key_cache, first_off, first_in, stride_dim, HEAD_DIM)
        first_v = load_values(value_cache, first_off, first_in, stride_dim, HEAD_DIM)
        handoff(PDL)

    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q_tile = tl.load(
        q + token * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    ).to(key_cache.dtype.element_ty)
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
        BLOCK_N,
        HEAD_DIM,
        PAGE_SIZE,
        SLIDING,
        SOFTCAP,
        IEEE_DOT,
        INTERPRET,
    )
    if FUSE_WRITE:
        # The last split also attends to this step's keys of the sequence up to its own token (one
        # for decode) and stores its token's key and value: no program here reads those cache slots.
        last = (split == num_splits - 1) & (seq < num_seqs)
        new_hi = tl.where(last, token + 1, q_begin)
        acc, m_i, l_i = _attend_new_keys(
            acc, m_i, l_i, q_tile, q_pos, first_new, q_begin, new_hi, k_new, v_new, kv_head,
            stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, scale, softcap, window,
            HEAD_DIM, SLIDING, SOFTCAP, INTERPRET,
        )  # fmt: skip
        slot = tl.load(slot_mapping + token).to(tl.int64)
        store = (offs_d < HEAD_DIM) & last & (slot >= 0)
        safe_slot = tl.maximum(slot, 0)
        dst = (safe_slot // PAGE_SIZE) * stride_page + (safe_slot % PAGE_SIZE) * stride_slot
        dst += kv_head.to(tl.int64) * stride_head + offs_d * stride_dim
        key = tl.load(k_new + token * stride_knt + kv_head * stride_knh + offs_d * stride_knd, mask=store)
        value = tl.load(v_new + token * stride_vnt + kv_head * stride_vnh + offs_d * stride_vnd, mask=store)
        tl.store(key_cache + dst, key.to(key_cache.dtype.element_ty), mask=store)
        tl.store(value_cache + dst, value.to(value_cache.dtype.element_ty), mask=store)
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


@triton.jit
def _prefetch_to_l2(  # type: ignore[no-untyped-def]
    first_weight, first_lines, second_weight, lines, program, programs, LINE: tl.constexpr, BLOCK: tl.constexpr
):
    """Program `program` of `programs` asks for its share of `lines` cache lines (LINE elements
    each: the first `first_lines` of first_weight, then second_weight's) to be brought into L2
    (`prefetch.global.L2`: nothing is returned or waited for, so the program moves on at once)."""
    per = tl.cdiv(lines, programs)
    end = tl.minimum((program + 1) * per, lines)
    offs = tl.arange(0, BLOCK)
    for begin in range(program * per, end, BLOCK):
        line = tl.minimum(begin + offs, end - 1).to(tl.int64)
        in_first = line < first_lines
        address = tl.where(in_first, first_weight + line * LINE, second_weight + (line - first_lines) * LINE)
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [address], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _merge_kernel(  # type: ignore[no-untyped-def]
    out,
    part_acc,
    part_m,
    part_l,
    prefetch,  # PREFETCH: constant weights whose first cache lines go to L2: prefetch_first of this one,
    prefetch_second,  # then this one's, prefetch_lines in all
    prefetch_first,
    prefetch_lines,
    stride_ot,
    stride_oh,
    stride_od,
    NUM_Q_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREFETCH: tl.constexpr,
    LINE: tl.constexpr,  # elements of `prefetch` per 128-byte line
    PDL: tl.constexpr,  # launched with programmatic dependent launch
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if PREFETCH:  # before the wait: launched early, these programs would otherwise idle while decode runs
        _prefetch_to_l2(
            prefetch, prefetch_first, prefetch_second, prefetch_lines,
            token * NUM_Q_HEADS + head, tl.num_programs(0) * NUM_Q_HEADS, LINE, 512,
        )  # fmt: skip
    handoff(PDL)
    splits = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    part = (token * NUM_Q_HEADS + head).to(tl.int64) * NUM_SPLITS + splits
    m = tl.load(part_m + part)
    l_part = tl.load(part_l + part)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_max)  # 0 for empty splits
    total = tl.sum(l_part * weight, 0)
    acc = tl.load(part_acc + part[:, None] * HEAD_DIM + offs_d[None, :])
    result = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out + token * stride_ot + head * stride_oh + offs_d * stride_od, result.to(out.dtype.element_ty))


def prefetch_lines(sizes: list[int], budget: int) -> tuple[int, int]:
    """(lines of the first weight, lines in all): whole 128-byte lines of weights of `sizes` bytes, in
    order, the first one first, at most two weights and `budget` bytes."""
    first = min(sizes[0], budget) // 128 if sizes else 0
    second = min(sizes[1] // 128, budget // 128 - first) if len(sizes) > 1 else 0
    return first, first + second


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 8  # the interpreter: any modest number


def choose_splits(num_tokens: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per (token, kv head), a power of two, from shapes only: enough programs to fill
    the GPU twice over, but no split shorter than MIN_KEYS_PER_SPLIT keys of the longest context."""
    target = 2 * _multiprocessors(device)
    splits = 1
    while (
        splits < MAX_SPLITS
        and num_tokens * num_kv_heads * splits < target
        and 2 * splits * MIN_KEYS_PER_SPLIT <= max_context
    ):
        splits *= 2
    return splits


def decode_attention(
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
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    prefetch: tuple[torch.Tensor, ...] = (),
    early_keys: bool = True,
    prefetch_bytes: int = PREFETCH_BYTES,
) -> torch.Tensor:
    """Attend each query token of q [T, Hq, D] to its cached keys; writes and returns out.

    With new_kv = (k, v, slot_mapping), this step's keys and values are not in the cache yet: the
    kernel attends to them from k/v and stores them at slot_mapping itself (what `write_kv` would
    do first), saving a kernel launch per layer. Every key it then reads from the cache was written
    by an earlier step, so under PDL each program loads its first key tile (block table, keys,
    values) before waiting for the kernel that computes q, k and v, taking those dependent loads
    off the step's critical path (`early_keys=False` waits first: a diagnostic).
    prefetch: constant weights read right after this call, in order (the output projection's, then
    the next one's). When the splits are merged by a second kernel, that kernel is launched early
    (PDL) and waits for this one while attention's chain of dependent loads leaves the memory bus
    idle; its programs first ask for up to `prefetch_bytes` of the weights (the first one first; at
    most two) to be brought into L2, so the projections start from cache (`prefetch_bytes=0`
    turns that off: a diagnostic).
    num_splits (a power of two) and config override the shape-based choices (tests, benchmarks)."""
    num_tokens, num_q_heads, head_dim = q.shape
    key_cache, value_cache = kv_cache[layer, 0], kv_cache[layer, 1]
    num_kv_heads, page_size = key_cache.shape[2], key_cache.shape[1]
    if num_tokens == 0:
        return out
    group = num_q_heads // num_kv_heads
    config = config or default_config(head_dim)
    block_n = config.block_n
    if num_splits is None:
        max_context = block_tables.shape[1] * page_size
        if sliding_window > 0:
            max_context = min(max_context, sliding_window + block_n)
        num_splits = choose_splits(num_tokens, num_kv_heads, max_context, q.device)
    assert num_splits > 0 and num_splits & (num_splits - 1) == 0, f"num_splits must be a power of two, got {num_splits}"
    if num_splits > 1:
        part_acc = torch.empty(num_tokens, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_tokens, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    pdl = pdl_enabled(q.device)
    k_new, v_new, slot_mapping = new_kv if new_kv is not None else (q, q, seq_lens)  # the latter unused
    _decode_kernel[(num_tokens, num_kv_heads, num_splits)](
        out,
        part_acc,
        part_m,
        part_l,
        q,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        k_new,
        v_new,
        slot_mapping,
        block_tables.shape[0],
        num_splits,
        *q.stride(),
        *out.stride(),
        block_tables.stride(0),
        *key_cache.stride(),
        *k_new.stride(),
        *v_new.stride(),
        scale,
        softcap,
        sliding_window,
        NUM_Q_HEADS=num_q_heads,
        SPLIT=num_splits > 1,
        FUSE_WRITE=new_kv is not None,
        EARLY=new_kv is not None and early_keys,
        GROUP=group,
        ROWS=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        SLIDING=sliding_window > 0,
        SOFTCAP=softcap > 0.0,
        IEEE_DOT=q.dtype == torch.float32,
        INTERPRET=interpreting(),
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(pdl),
    )
    if num_splits > 1:
        weights = [w for w in prefetch[:2] if w.is_cuda and w.is_contiguous() and w.dtype == out.dtype]
        if interpreting() or len(weights) != len(prefetch[:2]):
            weights = []
        line = 128 // out.element_size()
        first_lines, lines = prefetch_lines([w.numel() * w.element_size() for w in weights], prefetch_bytes)
        _merge_kernel[(num_tokens, num_q_heads)](
            out,
            part_acc,
            part_m,
            part_l,
            weights[0] if weights else out,
            weights[-1] if weights else out,
            first_lines,
            lines,
            *out.stride(),
            NUM_Q_HEADS=num_q_heads,
            NUM_SPLITS=num_splits,
            HEAD_DIM=head_dim,
            PREFETCH=lines > 0,
            LINE=max(line, 1),
            PDL=pdl,
            num_warps=4,
            **launch_options(pdl),
        )
    return out
