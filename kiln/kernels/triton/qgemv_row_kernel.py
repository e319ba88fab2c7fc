"""The quantized linear's one-row Triton kernel (launched by `kiln.kernels.triton.qgemv.qlinear_gemv`).

A decode step reads each packed weight once for one token row, so the kernel must turn bytes into
products with very few instructions: int4 at copy bandwidth leaves an H100 SM about 5 instructions
a weight (int8 10). The layout is chosen so that Triton compiles it without shared-memory
shuffles or cross-thread sums inside the loop (checked in the sm_90 SASS):

- the weight tile is [BLOCK_N, BLOCK_K / 4] int32 words, each thread holding 2 consecutive words
  (8 bytes) of every one of the BLOCK_N rows, so one x value serves BLOCK_N weights;
- each byte becomes a float32 by one PTX `prmt` (or shifts and masks under the interpreter); the
  four byte positions are joined back in column order, so the x tile is read as plain contiguous
  columns (8 a thread, one 16-byte load) in the weight tile's own layout;
- a thread's 8 columns lie in one quantization group, so their products are summed in registers
  and only that sum meets the group's scale and zero point: scale * (sum(q x) - zero * sum(x)).

No subtraction per weight: an int4 nibble q placed in bits 16..19 under 0x3F000000 reads exactly as
f = 0.5 + q / 256, so sum(q x) = 256 sum(f x) - 128 sum(x); an int8 byte with its sign bit flipped
(b = q + 128) in bits 8..15 under 0x3F800000 reads as f = 1 + b / 32768, so sum(q x) = 32768 sum(f x)
- 32896 sum(x). The sums run over a thread's 8 columns, where the constant part of f outweighs its
value part by at most 256x (int8), so the run's sum keeps ~16 of float32's 24 bits (relative error
~1e-4 of the run, far below bf16's 4e-3). The int4 layout is `kiln.kernels.quantized_weight`'s:
byte j holds column j (low nibble) and K/2 + j (high nibble).

The fusions are the dense GEMV's: an RMSNorm or SiLU-and-multiply prologue on x, and bias,
residual, rotary pairs or gated pairs after the product (`kiln.kernels.triton.gemv.linear_triton`'s
meaning). With ROPE or GATED a program holds BLOCK_N / 2 column pairs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.gemv_kernel import _inverse_rms
from kiln.kernels.triton.pdl import handoff
from kiln.kernels.triton.rope import rotate_rounded
from kiln.kernels.triton.silu_mul import silu_times

NIBBLE_MAGIC = 0x3F000000  # float32 0.5; a nibble q in bits 16..19 reads as 0.5 + q / 256
BYTE_MAGIC = 0x3F800000  # float32 1.0; a byte b in bits 8..15 reads as 1 + b / 32768


@triton.jit
def _prmt(words, magic, SEL: tl.constexpr):  # type: ignore[no-untyped-def]
    """PTX prmt with a constant selector: each result byte is a byte of words (0-3) or of magic (4-7)."""
    if SEL == 0x7054:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7054;"
    elif SEL == 0x7154:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7154;"  # type: ignore[no-redef]
    elif SEL == 0x7254:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7254;"  # type: ignore[no-redef]
    elif SEL == 0x7354:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7354;"  # type: ignore[no-redef]
    elif SEL == 0x7604:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7604;"  # type: ignore[no-redef]
    elif SEL == 0x7614:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7614;"  # type: ignore[no-redef]
    elif SEL == 0x7624:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7624;"  # type: ignore[no-redef]
    else:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7634;"  # type: ignore[no-redef]
    return tl.inline_asm_elementwise(asm, "=r,r,r", [words, magic], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _byte_value(words, magic, BYTE: tl.constexpr, NIBBLE: tl.constexpr, ASM: tl.constexpr):  # type: ignore[no-untyped-def]
    """Byte BYTE of each word as float32: 0.5 + byte / 256 (NIBBLE: bytes below 16 in bits 16..23
    under NIBBLE_MAGIC) or 1 + byte / 32768 (in bits 8..15 under BYTE_MAGIC)."""
    if ASM:
        if NIBBLE:
            bits = _prmt(words, magic, 0x7054 + 256 * BYTE)
        else:
            bits = _prmt(words, magic, 0x7604 + 16 * BYTE)
    else:
        if NIBBLE:
            bits = (((words >> (8 * BYTE)) & 0xFF) << 16) | magic
        else:
            bits = (((words >> (8 * BYTE)) & 0xFF) << 8) | magic
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _x_columns(x, cols, ok, K, stride_xk, norm_w, inv_rms, eps, PROLOGUE: tl.constexpr, EVEN_K: tl.constexpr):  # type: ignore[no-untyped-def]
    """float32 x[cols] of the one row after the prologue (0 where not ok), rounded as the dense GEMV rounds."""
    ptrs = x + cols * stride_xk
    if EVEN_K:
        xv = tl.load(ptrs)
    else:
        xv = tl.load(ptrs, mask=ok, other=0.0)
    if PROLOGUE == 1:  # silu(gate) * up, gate = x[:K], up = x[K:]
        if EVEN_K:
            up = tl.load(ptrs + K * stride_xk)
        else:
            up = tl.load(ptrs + K * stride_xk, mask=ok, other=0.0)
        gate = xv.to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(xv.dtype)
        xv = (act.to(tl.float32) * up.to(tl.float32)).to(xv.dtype)
    elif PROLOGUE == 2:
        if EVEN_K:
            scale = tl.load(norm_w + cols)
        else:
            scale = tl.load(norm_w + cols, mask=ok, other=0.0)
        normed = (xv.to(tl.float32) * inv_rms).to(xv.dtype)
        xv = (scale.to(tl.float32) * normed.to(tl.float32)).to(xv.dtype)
    return xv.to(tl.float32)


@triton.jit
def _half_tile(  # type: ignore[no-untyped-def]
    acc,
    words,  # [BN, WK] int32: int4 nibbles masked to the low 4 bits of each byte, or int8 bytes sign-flipped
    magic,
    x,
    col0,  # the tile's first column
    byte0,  # the tile's first byte in the packed row (K tails)
    KB,
    K,
    stride_xk,
    norm_w,
    inv_rms,
    eps,
    scales,
    zeros,
    offs_n,
    n_ok,
    stride_sn,
    stride_zn,
    NIBBLE: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    PER_ROW: tl.constexpr,
    ASM: tl.constexpr,
    PROLOGUE: tl.constexpr,
    EVEN_K: tl.constexpr,
    WPT: tl.constexpr,
):
    """acc [BN, WK / WPT] + each thread's 4 WPT-column sums of this tile, scaled by their groups (not PER_ROW)."""
    BN: tl.constexpr = words.shape[0]
    WK: tl.constexpr = words.shape[1]
    f = tl.join(
        tl.join(_byte_value(words, magic, 0, NIBBLE, ASM), _byte_value(words, magic, 2, NIBBLE, ASM)),
        tl.join(_byte_value(words, magic, 1, NIBBLE, ASM), _byte_value(words, magic, 3, NIBBLE, ASM)),
    )
    f = tl.reshape(f, (BN, 4 * WK))  # column 4 w + i: byte i of word w
    offs = tl.arange(0, 4 * WK)
    xv = _x_columns(x, col0 + offs, byte0 + offs < KB, K, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K)
    products = tl.sum(tl.reshape(f * xv[None, :], (BN, WK // WPT, 4 * WPT)), axis=2)
    x_sums = tl.sum(tl.reshape(xv, (WK // WPT, 4 * WPT)), axis=1)
    if NIBBLE:  # f = 0.5 + q / 256
        products = 256.0 * products - 128.0 * x_sums[None, :]
    else:  # f = 1 + (q + 128) / 32768
        products = 32768.0 * products - 32896.0 * x_sums[None, :]
    if PER_ROW:
        return acc + products
    group = (col0 + tl.arange(0, WK // WPT) * (4 * WPT)) // GROUP
    s = _rows_of(scales, stride_sn, offs_n, n_ok, group, products)
    if HAS_ZEROS:
        z = _rows_of(zeros, stride_zn, offs_n, n_ok, group, products)
        return acc + s * (products - z * x_sums[None, :])
    return acc + s * products


@triton.jit
def _rows_of(params, stride, offs_n, n_ok, group, like):  # type: ignore[no-untyped-def]
    """float32 params[offs_n, group] as [BN, CH] in like's layout, read one weight row at a time: a
    thread then reads each row's value for its own chunk (a 2-D gather would spread the rows over
    threads and cost a shared-memory exchange each step). Rows past N read row 0 (their results are
    never stored), so the loads need no mask."""
    BN: tl.constexpr = like.shape[0]
    rows = tl.arange(0, BN)
    row_offsets = tl.where(n_ok, offs_n, 0) * stride
    out = tl.zeros_like(like)
    for r in tl.static_range(BN):
        offset = tl.sum(tl.where(rows == r, row_offsets, 0))
        value = tl.load(params + (offset + group)).to(tl.float32)
        out = tl.where(rows[:, None] == r, value[None, :], out)
    return out


@triton.jit
def _load_words(w_rows, n_ok, offs_w, byte0, KB, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, WPT: tl.constexpr):  # type: ignore[no-untyped-def]
    """The tile at byte byte0 of int32 rows w_rows as words [BN, BK / 4], WPT consecutive ones a thread
    and load (0 past N and KB); the one-row and the older few-row kernel's read."""
    ptrs = w_rows + tl.max_contiguous(byte0 // 4 + offs_w, WPT)[None, :]
    if EVEN_K:
        if EVEN_N:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=n_ok[:, None], other=0)
    else:
        return tl.load(ptrs, mask=n_ok[:, None] & (byte0 + 4 * offs_w < KB)[None, :], other=0)


@triton.jit
def _tile(  # type: ignore[no-untyped-def]
    acc, raw, byte0, magic, x, KB, K, stride_xk, norm_w, inv_rms, eps,
    scales, zeros, offs_n, n_ok, stride_sn, stride_zn,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_ROW: tl.constexpr, ASM: tl.constexpr,
    PROLOGUE: tl.constexpr, EVEN_K: tl.constexpr, WPT: tl.constexpr,
):  # fmt: skip
    """One step: the byte tile at byte0 (int4: columns byte0.. and KB + byte0..)."""
    if BITS == 4:
        acc = _half_tile(
            acc, raw & 0x0F0F0F0F, magic, x, byte0, byte0, KB, K, stride_xk, norm_w, inv_rms, eps,
            scales, zeros, offs_n, n_ok, stride_sn, stride_zn, True, GROUP, HAS_ZEROS, PER_ROW, ASM, PROLOGUE, EVEN_K,
            WPT,
        )  # fmt: skip
        acc = _half_tile(
            acc, (raw >> 4) & 0x0F0F0F0F, magic, x, KB + byte0, byte0, KB, K, stride_xk, norm_w, inv_rms, eps,
            scales, zeros, offs_n, n_ok, stride_sn, stride_zn, True, GROUP, HAS_ZEROS, PER_ROW, ASM, PROLOGUE, EVEN_K,
            WPT,
        )  # fmt: skip
    else:
        acc = _half_tile(
            acc, raw ^ -2139062144, magic, x, byte0, byte0, KB, K, stride_xk, norm_w, inv_rms, eps,
            scales, zeros, offs_n, n_ok, stride_sn, stride_zn, False, GROUP, HAS_ZEROS, PER_ROW, ASM, PROLOGUE, EVEN_K,
            WPT,
        )  # fmt: skip
    return acc


@triton.jit
def _row_columns(  # type: ignore[no-untyped-def]
    pid, N, rope_pairs, half_n, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, GATED: tl.constexpr, HALF_D: tl.constexpr
):
    """The program's BLOCK_N output columns; with ROPE or GATED, BLOCK_N / 2 pairs (a, b) in turn:
    ROPE pairs below rope_pairs are (d, d + HALF_D) of one head, then plain neighbours; GATED pairs
    are gate column j and its up column half_n + j. Returns (columns, pair index of each)."""
    idx = tl.arange(0, BLOCK_N)
    if ROPE or GATED:
        pair = pid * (BLOCK_N // 2) + idx // 2
        side = idx % 2
        if ROPE:
            rotated = (pair // HALF_D) * (2 * HALF_D) + pair % HALF_D + side * HALF_D
            plain = 2 * rope_pairs + (pair - rope_pairs) * 2 + side
            return tl.where(pair < rope_pairs, rotated, plain), pair
        else:
            return pair + side * half_n, pair
    else:
        cols = pid * BLOCK_N + idx
        return cols, cols


@triton.jit
def _qrow_kernel(  # type: ignore[no-untyped-def]
    x,  # [1, K] (or [1, 2K] with the silu_mul prologue)
    w,  # packed bytes [N, KB] viewed as int32 words
    scales,  # [N, K // GROUP]
    zeros,
    bias,
    out,  # [1, N] in x's dtype ([1, N / 2] GATED), or [SPLIT, 1, N] fp32 partial sums when SPLIT > 1
    N,
    K,
    KB,
    stride_xk,
    stride_wn,  # in words
    stride_sn,
    stride_zn,
    stride_on,
    stride_os,
    residual,
    stride_rn,
    norm_w,
    eps,
    cos,
    sin,
    rope_pairs,
    half_n,
    magic,  # NIBBLE_MAGIC (int4) or BYTE_MAGIC (int8): a register operand, so prmt's selector is the immediate
    KB_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
    K_PAD: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    PER_ROW: tl.constexpr,  # one scale per weight row, no zero points: applied once after the sum
    ASM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # packed bytes per row and step; 4 WPT a thread
    WPT: tl.constexpr,  # words a thread holds in each weight row of a tile: 2 or 4
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    EARLY_W: tl.constexpr,
    PROLOGUE: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ROPE: tl.constexpr,
    HALF_D: tl.constexpr,
    GATED: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(2)
    offs_n, pair = _row_columns(pid, N, rope_pairs, half_n, BLOCK_N, ROPE, GATED, HALF_D)
    n_ok = offs_n < N
    byte_begin = pid_k * KB_PER_SPLIT
    offs_w = tl.arange(0, BLOCK_K // 4)
    w_rows = w + offs_n[:, None] * stride_wn
    if not EARLY_W:
        handoff(PDL)
    raw = _load_words(w_rows, n_ok, offs_w, byte_begin, KB, EVEN_N, EVEN_K, WPT)
    if EARLY_W:
        handoff(PDL)
    magic = magic + tl.zeros((BLOCK_N, BLOCK_K // 4), tl.int32)
    if PROLOGUE == 2:
        inv_rms = tl.sum(_inverse_rms(x, 0, stride_xk, tl.arange(0, 1), tl.arange(0, 1) < 1, K, eps, K_PAD, 1, 256))
    else:
        inv_rms = 0.0
    acc = tl.zeros((BLOCK_N, BLOCK_K // (4 * WPT)), dtype=tl.float32)
    for step in range(BLOCK_K, KB_PER_SPLIT, BLOCK_K):  # the next tile is read before this one is used
        following = _load_words(w_rows, n_ok, offs_w, byte_begin + step, KB, EVEN_N, EVEN_K, WPT)
        acc = _tile(
            acc, raw, byte_begin + step - BLOCK_K, magic, x, KB, K, stride_xk, norm_w, inv_rms, eps,
            scales, zeros, offs_n, n_ok, stride_sn, stride_zn, BITS, GROUP, HAS_ZEROS, PER_ROW, ASM, PROLOGUE, EVEN_K,
            WPT,
        )  # fmt: skip
        raw = following
    acc = _tile(
        acc, raw, byte_begin + KB_PER_SPLIT - BLOCK_K, magic, x, KB, K, stride_xk, norm_w, inv_rms, eps,
        scales, zeros, offs_n, n_ok, stride_sn, stride_zn, BITS, GROUP, HAS_ZEROS, PER_ROW, ASM, PROLOGUE, EVEN_K,
            WPT,
    )  # fmt: skip
    result = tl.sum(acc, axis=1)
    if PER_ROW:
        result = result * tl.load(scales + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT > 1:
        tl.store(out + pid_k * stride_os + offs_n * stride_on, result, mask=n_ok)
    else:
        if HAS_BIAS:
            result += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        result = result.to(out.dtype.element_ty)
        if RESIDUAL:
            res = tl.load(residual + offs_n * stride_rn, mask=n_ok, other=0.0)
            result = (res.to(tl.float32) + result.to(tl.float32)).to(out.dtype.element_ty)
        if ROPE or GATED:
            _pairs_out(result, offs_n, n_ok, pair, out, stride_on, cos, sin, rope_pairs, half_n, BLOCK_N, ROPE, HALF_D)
        else:
            tl.store(out + offs_n * stride_on, result, mask=n_ok)


@triton.jit
def _pairs_out(  # type: ignore[no-untyped-def]
    result,
    offs_n,
    n_ok,
    pair,
    out,
    stride_on,
    cos,
    sin,
    rope_pairs,
    half_n,
    BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr,
    HALF_D: tl.constexpr,
):
    """The pair epilogues on [BLOCK_N] results (pairs (a, b) in turn): ROPE rotates the pairs below
    rope_pairs (a at d, b at d + HALF_D of one head) as `reference.rope` and stores both columns;
    GATED stores silu(a) * b at column pair (`kiln.kernels.reference.silu_mul`'s rounding)."""
    P: tl.constexpr = BLOCK_N // 2
    a, b = tl.split(tl.reshape(result.to(tl.float32), (P, 2)))
    col_a, col_b = tl.split(tl.reshape(offs_n, (P, 2)))
    ok_a, ok_b = tl.split(tl.reshape(n_ok, (P, 2)))
    index, _ = tl.split(tl.reshape(pair, (P, 2)))
    if ROPE:
        d = col_a % (2 * HALF_D)
        ra = rotate_rounded(a, -b, tl.load(cos + d).to(tl.float32), tl.load(sin + d).to(tl.float32), result)
        rb = rotate_rounded(
            b, a, tl.load(cos + d + HALF_D).to(tl.float32), tl.load(sin + d + HALF_D).to(tl.float32), result
        )
        rotated = index < rope_pairs
        tl.store(out + col_a * stride_on, tl.where(rotated, ra, a.to(result.dtype)), mask=ok_a)
        tl.store(out + col_b * stride_on, tl.where(rotated, rb, b.to(result.dtype)), mask=ok_b)
    else:
        tl.store(out + index * stride_on, silu_times(a, b, result), mask=index < half_n)


__all__ = ["BYTE_MAGIC", "NIBBLE_MAGIC", "_qrow_kernel"]
