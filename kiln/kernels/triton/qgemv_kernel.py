"""The quantized few-row linear's Triton kernel (launched by `kiln.kernels.triton.qgemv.qlinear_gemv`).

The dense kernel's structure (`kiln.kernels.triton.gemv_kernel`) with the weight read as packed
bytes and dequantized in registers: each program owns BLOCK_N weight rows and one split of K,
reads them in steps of BLOCK_K bytes, one step ahead of the arithmetic, and accumulates in
float32 on the CUDA cores. Its prologues (silu_mul, rms_norm) and epilogues (bias, residual,
rope pairs, gated pairs) are the dense kernel's own helpers.

At one row (CHUNKED, see `_step`) the loop is built for instruction count, since int4 at copy
bandwidth leaves an H100 SM about 4.5 instructions a weight: the tile is read as int32 words,
each byte becomes a float by one `prmt`, and scales and zero points meet sums of 8 products, not
single weights. For sm_90 that compiled to ~6.4 instructions a weight for int4 g128 and ~6 for
int8 (ptxas, 40-64 registers, no spills, no shared-memory shuffles); timings: the benchmark.
Other shapes (2..4 rows a program, groups that do not tile) dequantize whole tiles
(`qgemv_dequant.dequantize`) and multiply them as the dense kernel does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.gemv_epilogue import _store_tile, _tile_columns
from kiln.kernels.triton.gemv_kernel import _prologue, _row_inverse_rms, _tile_product
from kiln.kernels.triton.pdl import handoff
from kiln.kernels.triton.qgemv_dequant import dequantize, group_params, spread, unpack
from kiln.kernels.triton.qgemv_row_kernel import _load_words


@triton.jit
def _load_bytes(w_rows, n_ok, offs_b, kb, KB, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):  # type: ignore[no-untyped-def]
    # 8 bytes a thread and load, not 16: the x tile's layout (8 fp16/bf16 values a thread, 16 bytes)
    # then is the weight tile's, so the bytes need no shared-memory shuffle each step (ttgir, sm_90)
    ptrs = w_rows + tl.max_contiguous(kb + offs_b, 8)[None, :]
    if EVEN_K:
        if EVEN_N:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=n_ok[:, None], other=0)
    else:
        return tl.load(ptrs, mask=n_ok[:, None] & (kb + offs_b < KB)[None, :], other=0)


@triton.jit
def _word_fields(words, SHIFT: tl.constexpr, MASK: tl.constexpr, magic, BN: tl.constexpr, BK: tl.constexpr):  # type: ignore[no-untyped-def]
    """float32 2**23 + field of each byte of words [BN, BK / 4] (bits SHIFT.. of MASK), as [BN, BK]
    in column order (byte j of word i is column 4 i + j)."""
    shifts = (tl.arange(0, 4) * 8 + SHIFT)[None, None, :]
    fields = ((words[:, :, None] >> shifts) & MASK) | magic
    return tl.reshape(fields, (BN, BK)).to(tl.float32, bitcast=True)


@triton.jit
def _byte_floats(words, magic, BN: tl.constexpr, BK: tl.constexpr):  # type: ignore[no-untyped-def]
    """float32 2**23 + byte for each byte of words [BN, BK / 4], as [BN, BK] in column order: one
    `prmt` a byte puts it under magic's (0x4B000000) exponent bits (selector 0x744j: byte j of the
    word, two zero bytes of magic, then magic's top byte)."""
    shape: tl.constexpr = (BN, BK // 4, 4)
    a = tl.broadcast_to(words[:, :, None], shape)
    b = tl.broadcast_to((magic + tl.zeros((1, 1, 1), dtype=tl.int32)), shape)
    select = tl.broadcast_to((0x7440 + tl.arange(0, 4))[None, None, :], shape)
    fields = tl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, select], dtype=tl.int32, is_pure=True, pack=1
    )
    return tl.reshape(fields, (BN, BK)).to(tl.float32, bitcast=True)


@triton.jit
def _fields(  # type: ignore[no-untyped-def]
    words, SHIFT: tl.constexpr, MASK: tl.constexpr, magic, ASM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    """float32 2**23 + (byte >> SHIFT) & MASK for each byte of words, as [BN, BK] (see `_byte_floats`;
    without ASM, by shifts and masks: the interpreter runs no PTX)."""
    if ASM:
        if SHIFT == 0 and MASK == 0xFF:
            return _byte_floats(words, magic, BN, BK)
        elif SHIFT == 0:
            return _byte_floats(words & 0x0F0F0F0F, magic, BN, BK)
        else:
            return _byte_floats((words >> 4) & 0x0F0F0F0F, magic, BN, BK)
    else:
        return _word_fields(words, SHIFT, MASK, magic, BN, BK)


@triton.jit
def _x_tile(  # type: ignore[no-untyped-def]
    x,
    offs_m,
    m_ok,
    cols,
    limit,
    K,
    stride_xm,
    stride_xk,
    norm_w,
    inv_rms,
    eps,
    PROLOGUE: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """x's columns `cols` (zero at and past `limit`) through the prologue."""
    ptrs = x + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk
    if EVEN_K:
        xv = tl.load(ptrs, mask=m_ok[:, None], other=0.0)
    else:
        xv = tl.load(ptrs, mask=m_ok[:, None] & (cols < limit)[None, :], other=0.0)
    return _prologue(xv, ptrs, m_ok, cols, K, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K, False)


@triton.jit
def _chunk_sums(  # type: ignore[no-untyped-def]
    acc, d, xv, s, z, MODE: tl.constexpr, GPT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr
):
    """acc [BN, BK / CHUNK] + scale * (sum(d * x) - zero * sum(x)) over each run of CHUNK columns."""
    runs: tl.constexpr = BK // CHUNK
    dx = tl.sum(tl.reshape(d * xv, (BN, runs, CHUNK)), axis=2)
    xs = tl.sum(tl.reshape(xv, (1, runs, CHUNK)), axis=2)
    return acc + spread(s, MODE, GPT, BN, runs) * (dx - spread(z, MODE, GPT, BN, runs) * xs)


@triton.jit
def _step(  # type: ignore[no-untyped-def]
    acc,
    raw,
    kb,
    offs_b,
    offs_n,
    n_ok,
    x,
    offs_m,
    m_ok,
    K,
    KB,
    stride_xm,
    stride_xk,
    scales,
    zeros,
    stride_sn,
    stride_zn,
    norm_w,
    inv_rms,
    eps,
    magic,  # 0x4B000000 (float32 2**23), a register operand
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    MODE: tl.constexpr,
    GPT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    CHUNKED: tl.constexpr,
    CHUNK: tl.constexpr,
    ASM: tl.constexpr,
    PROLOGUE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The accumulator after one tile: [BN, BK / CHUNK] (CHUNKED), [BN, BK] or [BM, BN, BK].

    CHUNKED (one row, tiles of whole groups; raw is int32 words): each byte (int4: each nibble)
    becomes float32 2**23 + value by one `prmt` (`_fields`), the exact value by one subtraction;
    each run of CHUNK columns, one thread's, sums value * x, and only the run's sum meets its
    group's scale and zero point: scale * (sum(value * x) - zero * sum(x)), all small numbers, so
    nothing cancels. Else (raw is bytes): whole tiles dequantized, then multiplied."""
    cols = kb + offs_b
    if CHUNKED:  # raw: int32 words
        s, z = group_params(scales, zeros, offs_n, n_ok, kb, cols, K, stride_sn, stride_zn, GROUP, MODE, GPT, HAS_ZEROS)
        xv = _x_tile(x, offs_m, m_ok, cols, KB, K, stride_xm, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K)
        xv = xv.to(tl.float32)
        if BITS == 4:
            d = _fields(raw, 0, 0xF, magic, ASM, BLOCK_N, BLOCK_K) - 8388608.0
        else:  # the sign bits flipped: offset binary, value + 128
            d = _fields(raw ^ -2139062144, 0, 0xFF, magic, ASM, BLOCK_N, BLOCK_K) - 8388736.0
        acc = _chunk_sums(acc, d, xv, s, z, MODE, GPT, BLOCK_N, BLOCK_K, CHUNK)
        if BITS == 4:  # the high nibbles: columns K/2 + kb..
            cols = KB + kb + offs_b
            s, z = group_params(
                scales, zeros, offs_n, n_ok, KB + kb, cols, K, stride_sn, stride_zn, GROUP, MODE, GPT, HAS_ZEROS
            )
            xv = _x_tile(x, offs_m, m_ok, cols, K, K, stride_xm, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K)
            xv = xv.to(tl.float32)
            d = _fields(raw, 4, 0xF, magic, ASM, BLOCK_N, BLOCK_K) - 8388608.0
            acc = _chunk_sums(acc, d, xv, s, z, MODE, GPT, BLOCK_N, BLOCK_K, CHUNK)
        return acc
    else:
        first, second = unpack(raw, BITS)
        w = dequantize(
            first, scales, zeros, offs_n, n_ok, kb, cols, K, stride_sn, stride_zn,
            BITS, GROUP, MODE, GPT, HAS_ZEROS, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        xv = _x_tile(x, offs_m, m_ok, cols, KB, K, stride_xm, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K)
        acc += _tile_product(xv, w, BLOCK_M, False, False, False)
        if BITS == 4:
            cols = KB + kb + offs_b
            w = dequantize(
                second, scales, zeros, offs_n, n_ok, KB + kb, cols, K, stride_sn, stride_zn,
                BITS, GROUP, MODE, GPT, HAS_ZEROS, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            xv = _x_tile(x, offs_m, m_ok, cols, K, K, stride_xm, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K)
            acc += _tile_product(xv, w, BLOCK_M, False, False, False)
        return acc


@triton.jit
def _qlinear_kernel(  # type: ignore[no-untyped-def]
    x,
    w,  # packed bytes [N, KB] (uint8; int8 values viewed as uint8)
    scales,  # [N, K // GROUP]
    zeros,  # [N, K // GROUP] (HAS_ZEROS)
    bias,
    out,  # [M, N] in x's dtype ([M, N / 2] GATED), or [SPLIT, M, N] fp32 partial sums when SPLIT > 1
    M,
    N,
    K,  # columns of x used by the product
    KB,  # bytes of a packed row: K (int8) or K / 2 (int4)
    stride_xm,
    stride_xk,
    stride_wn,
    stride_sn,
    stride_zn,
    stride_om,
    stride_on,
    stride_os,
    residual,
    stride_rm,
    stride_rn,
    norm_w,
    eps,
    cos,
    sin,
    stride_cm,
    stride_sm,
    rope_pairs,
    half_n,
    magic,  # 0x4B000000 (see _step)
    KB_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
    K_PAD: tl.constexpr,  # K rounded up to a multiple of 256 (the rms_norm statistics' loop)
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    MODE: tl.constexpr,  # qgemv_dequant.GROUP_*
    GPT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    CHUNKED: tl.constexpr,  # one row, whole groups a tile (GROUP_TILE / GROUP_SPLIT), groups of whole chunks
    CHUNK: tl.constexpr,  # columns a thread holds in a row of a tile (the load's 8 bytes)
    ASM: tl.constexpr,  # CHUNKED: bytes to floats with PTX prmt (not under the interpreter)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,  # KB == SPLIT * KB_PER_SPLIT
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    EARLY_W: tl.constexpr,  # the weight is constant: its first tile may be read before the wait
    PROLOGUE: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ROPE: tl.constexpr,
    HALF_D: tl.constexpr,
    GATED: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_b = tl.arange(0, BLOCK_K)
    kb_begin = pid_k * KB_PER_SPLIT
    offs_n = _tile_columns(tile, rope_pairs, half_n, BLOCK_N, ROPE, GATED, HALF_D)
    n_ok = offs_n < N
    w_rows = w + offs_n[:, None] * stride_wn
    if not EARLY_W:
        handoff(PDL)
    offs_w = tl.arange(0, BLOCK_K // 4)
    if CHUNKED:
        raw = _load_words(w_rows.to(tl.pointer_type(tl.int32)), n_ok, offs_w, kb_begin, KB, EVEN_N, EVEN_K, 2)
    else:
        raw = _load_bytes(w_rows, n_ok, offs_b, kb_begin, KB, EVEN_N, EVEN_K)
    if EARLY_W:
        handoff(PDL)
    inv_rms = _row_inverse_rms(x, stride_xm, stride_xk, offs_m, m_ok, K, eps, PROLOGUE == 2, K_PAD, BLOCK_M, 256)
    if CHUNKED:
        acc = tl.zeros((BLOCK_N, BLOCK_K // CHUNK), dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for step in range(BLOCK_K, KB_PER_SPLIT, BLOCK_K):  # the next byte tile is read before this one is used
        if CHUNKED:
            following = _load_words(
                w_rows.to(tl.pointer_type(tl.int32)), n_ok, offs_w, kb_begin + step, KB, EVEN_N, EVEN_K, 2
            )
        else:
            following = _load_bytes(w_rows, n_ok, offs_b, kb_begin + step, KB, EVEN_N, EVEN_K)
        acc = _step(
            acc, raw, kb_begin + step - BLOCK_K, offs_b, offs_n, n_ok, x, offs_m, m_ok, K, KB, stride_xm, stride_xk,
            scales, zeros, stride_sn, stride_zn, norm_w, inv_rms, eps, magic,
            BITS, GROUP, MODE, GPT, HAS_ZEROS, CHUNKED, CHUNK, ASM, PROLOGUE, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        raw = following
    acc = _step(
        acc, raw, kb_begin + KB_PER_SPLIT - BLOCK_K, offs_b, offs_n, n_ok, x, offs_m, m_ok, K, KB, stride_xm, stride_xk,
        scales, zeros, stride_sn, stride_zn, norm_w, inv_rms, eps, magic,
        BITS, GROUP, MODE, GPT, HAS_ZEROS, CHUNKED, CHUNK, ASM, PROLOGUE, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if BLOCK_M == 1:
        result = tl.sum(acc, axis=1)[None, :]
    else:
        result = tl.sum(acc, axis=2)
    _store_tile(
        result, out, offs_m, offs_n, m_ok, n_ok, tile, pid_k, m_ok, stride_om, stride_on, stride_os,
        bias, residual, stride_rm, stride_rn, cos, sin, stride_cm, stride_sm, rope_pairs,
        HAS_BIAS, SPLIT, ROPE, HALF_D, RESIDUAL, GATED,
    )  # fmt: skip
