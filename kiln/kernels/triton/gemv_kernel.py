"""The small-M linear's Triton kernels: the product with its prologues and epilogues, and the split-K sum
(launched by `kiln.kernels.triton.gemv.linear_triton`)."""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.gemv_epilogue import _store_tile, _tile_columns
from kiln.kernels.triton.pdl import handoff


@triton.jit
def _load_w(w_ptrs, n_ok, k_idx, K, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):  # type: ignore[no-untyped-def]
    if EVEN_K:
        if EVEN_N:
            return tl.load(w_ptrs)
        else:
            return tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        return tl.load(w_ptrs, mask=n_ok[:, None] & (k_idx < K)[None, :], other=0.0)


@triton.jit
def _load_x(x_ptrs, m_ok, k_idx, K, EVEN_K: tl.constexpr):  # type: ignore[no-untyped-def]
    if EVEN_K:
        return tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
    else:
        return tl.load(x_ptrs, mask=m_ok[:, None] & (k_idx < K)[None, :], other=0.0)


@triton.jit
def _prologue(  # type: ignore[no-untyped-def]
    xv,
    x_ptrs,
    m_ok,
    k_idx,
    K,
    stride_xk,
    norm_w,
    inv_rms,
    eps,
    PROLOGUE: tl.constexpr,
    EVEN_K: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    """The x tile the product uses, from the tile loaded at x_ptrs (see PROLOGUE_*)."""
    if PROLOGUE == 1:
        up = _load_x(x_ptrs + K * stride_xk, m_ok, k_idx, K, EVEN_K)
        gate = xv.to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(xv.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(xv.dtype)
    elif PROLOGUE == 2:
        if EVEN_K:
            scale = tl.load(norm_w + k_idx)
        else:
            scale = tl.load(norm_w + k_idx, mask=k_idx < K, other=0.0)
        if ONE_TILE:  # the tile is the whole row: its statistics need no second read
            xf = xv.to(tl.float32)
            inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / K + eps)
        normed = (xv.to(tl.float32) * inv_rms[:, None]).to(xv.dtype)
        return (scale.to(tl.float32)[None, :] * normed.to(tl.float32)).to(xv.dtype)
    else:
        return xv


@triton.jit
def _inverse_rms(  # type: ignore[no-untyped-def]
    x, stride_xm, stride_xk, offs_m, m_ok, K, eps, K_PADDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """1 / sqrt(mean(x^2) + eps) of each row of x (fp32), reading the whole row (K <= K_PADDED)."""
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, K_PADDED, BLOCK_K):
        ok = m_ok[:, None] & ((k + offs_k) < K)[None, :]
        xv = tl.load(x + offs_m[:, None] * stride_xm + (k + offs_k)[None, :] * stride_xk, mask=ok, other=0.0)
        xf = xv.to(tl.float32)
        total += tl.sum(xf * xf, axis=1)
    return tl.math.rsqrt(total / K + eps)


@triton.jit
def _row_inverse_rms(  # type: ignore[no-untyped-def]
    x,
    stride_xm,
    stride_xk,
    offs_m,
    m_ok,
    K,
    eps,
    NEEDED: tl.constexpr,
    K_PADDED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`_inverse_rms` of the rows when NEEDED (an rms_norm prologue's statistics, read before the loop), else zeros."""
    if NEEDED:
        return _inverse_rms(x, stride_xm, stride_xk, offs_m, m_ok, K, eps, K_PADDED, BLOCK_M, BLOCK_K)
    else:
        return tl.zeros((BLOCK_M,), dtype=tl.float32)


@triton.jit
def _tile_product(xv, wv, BLOCK_M: tl.constexpr, DOT: tl.constexpr, SWAP: tl.constexpr, IEEE_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    """One K tile's contribution: [BN, BM] (DOT and SWAP), [BM, BN] (DOT), [BN, BK] (one row) or [BM, BN, BK]."""
    if DOT:
        if SWAP:
            if IEEE_DOT:
                return tl.dot(wv, tl.trans(xv), input_precision="ieee")
            else:
                return tl.dot(wv, tl.trans(xv))
        else:
            if IEEE_DOT:
                return tl.dot(xv, tl.trans(wv), input_precision="ieee")
            else:
                return tl.dot(xv, tl.trans(wv))
    elif BLOCK_M == 1:
        return wv.to(tl.float32) * xv.to(tl.float32)
    else:
        return xv.to(tl.float32)[:, None, :] * wv.to(tl.float32)[None, :, :]


@triton.jit
def _w_tile(w, offs_n, k_idx, stride_wn, stride_wk):  # type: ignore[no-untyped-def]
    return w + offs_n[:, None] * stride_wn + k_idx[None, :] * stride_wk


@triton.jit
def _linear_kernel(  # type: ignore[no-untyped-def]
    x,
    w,
    bias,
    out,  # [M, N] in x's dtype, or [SPLIT, M, N] fp32 partial sums when SPLIT > 1
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    stride_os,
    residual,  # [M, N], added to the result (RESIDUAL)
    stride_rm,
    stride_rn,
    norm_w,  # [K] RMSNorm weight (PROLOGUE_RMS_NORM)
    eps,
    cos,  # [M, 2 * HALF_D] rotary tables (ROPE)
    sin,
    stride_cm,
    stride_sm,
    rope_pairs,  # ROPE: column tiles 0 .. rope_pairs - 1 each hold columns d and d + HALF_D of one head
    half_n,  # GATED: N // 2, the gate columns' count
    n_tiles,  # column tiles in all (see _tile_columns); a program holds TILES of them
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K (a constant trip count; one compile per weight width)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    SWAP: tl.constexpr,
    EVEN_N: tl.constexpr,  # every column tile of every program is whole (no column masks)
    EVEN_K: tl.constexpr,  # K == SPLIT * K_PER_SPLIT
    SPLIT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch
    EARLY_W: tl.constexpr,  # the weight is constant: its first tile may be read before the wait
    PROLOGUE: tl.constexpr,  # PROLOGUE_*: what x goes through before the product
    RESIDUAL: tl.constexpr,  # out = residual + x @ w.T (each rounded to out's dtype, as two ops would)
    ONE_TILE: tl.constexpr,  # SPLIT == 1 and K_PER_SPLIT == BLOCK_K: one tile holds a whole row of x
    ROPE: tl.constexpr,  # rotary embedding of the first 2 * rope_pairs columns (BLOCK_N == 2, SPLIT == 1)
    HALF_D: tl.constexpr,  # ROPE: half the head dim
    GATED: tl.constexpr,  # out[:, j] = silu(column j) * column half_n + j (BLOCK_N == 2, SPLIT == 1)
    TILES: tl.constexpr,  # column tiles per program, in turn, each one's first weight tile read during the one before
):
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = pid_k * K_PER_SPLIT
    m_ok = offs_m < M
    x_ptrs = x + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    first = tl.program_id(0) * TILES  # this program's column tiles: first .. first + TILES - 1
    offs_n = _tile_columns(first, rope_pairs, half_n, BLOCK_N, ROPE, GATED, HALF_D)
    n_ok = (offs_n < N) & (first < n_tiles)
    # The weight is read one tile ahead of x (double buffering by hand), starting before the wait
    # when the weight is constant.
    if not EARLY_W:
        handoff(PDL)
    wv = _load_w(_w_tile(w, offs_n, k_begin + offs_k, stride_wn, stride_wk), n_ok, k_begin + offs_k, K, EVEN_N, EVEN_K)
    if EARLY_W:
        handoff(PDL)
    inv_rms = _row_inverse_rms(
        x, stride_xm, stride_xk, offs_m, m_ok, K, eps, PROLOGUE == 2 and not ONE_TILE, SPLIT * K_PER_SPLIT, BLOCK_M,
        BLOCK_K,
    )  # fmt: skip
    if ONE_TILE:  # x is one tile, the same for every column tile: read (and through its prologue) once
        k_idx = k_begin + offs_k
        x_whole = _load_x(x_ptrs, m_ok, k_idx, K, EVEN_K)
        x_whole = _prologue(
            x_whole, x_ptrs, m_ok, k_idx, K, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K, ONE_TILE
        )
    for t in tl.static_range(TILES):
        tile = first + t
        w_ptrs = _w_tile(w, offs_n, k_begin + offs_k, stride_wn, stride_wk)
        if DOT:
            if SWAP:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        elif BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
            w_next = _load_w(w_ptrs + k * stride_wk, n_ok, k_begin + k + offs_k, K, EVEN_N, EVEN_K)
            k_idx = k_begin + k - BLOCK_K + offs_k
            xv = _load_x(x_ptrs + (k - BLOCK_K) * stride_xk, m_ok, k_idx, K, EVEN_K)
            x_tile = x_ptrs + (k - BLOCK_K) * stride_xk
            xv = _prologue(xv, x_tile, m_ok, k_idx, K, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K, ONE_TILE)
            acc += _tile_product(xv, wv, BLOCK_M, DOT, SWAP, IEEE_DOT)
            wv = w_next
        if t + 1 < TILES:  # the next column tile's first weight tile, read while this one finishes
            next_n = _tile_columns(tile + 1, rope_pairs, half_n, BLOCK_N, ROPE, GATED, HALF_D)
            next_ok = (next_n < N) & (tile + 1 < n_tiles)
            w_following = _load_w(
                _w_tile(w, next_n, k_begin + offs_k, stride_wn, stride_wk), next_ok, k_begin + offs_k, K, EVEN_N, EVEN_K
            )
        if ONE_TILE:
            xv = x_whole
        else:
            last = K_PER_SPLIT - BLOCK_K
            k_idx = k_begin + last + offs_k
            xv = _load_x(x_ptrs + last * stride_xk, m_ok, k_idx, K, EVEN_K)
            x_tile = x_ptrs + last * stride_xk
            xv = _prologue(xv, x_tile, m_ok, k_idx, K, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K, ONE_TILE)
        acc += _tile_product(xv, wv, BLOCK_M, DOT, SWAP, IEEE_DOT)
        if DOT:
            if SWAP:
                result = tl.trans(acc)
            else:
                result = acc
        elif BLOCK_M == 1:
            result = tl.sum(acc, axis=1)[None, :]
        else:
            result = tl.sum(acc, axis=2)
        _store_tile(
            result, out, offs_m, offs_n, m_ok, n_ok, tile, pid_k, m_ok & (tile < n_tiles), stride_om, stride_on,
            stride_os, bias, residual, stride_rm, stride_rn, cos, sin, stride_cm, stride_sm, rope_pairs,
            HAS_BIAS, SPLIT, ROPE, HALF_D, RESIDUAL, GATED,
        )  # fmt: skip
        if t + 1 < TILES:
            wv = w_following
            offs_n = next_n
            n_ok = next_ok


@triton.jit
def _sum_splits_kernel(  # type: ignore[no-untyped-def]
    partial,  # [SPLIT, M, N] fp32, contiguous
    bias,
    out,
    residual,
    M,
    N,
    stride_om,
    stride_on,
    stride_rm,
    stride_rn,
    HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    handoff(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(partial + s * M * N + offs, mask=ok, other=0.0)
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(bias + col, mask=ok, other=0.0).to(tl.float32)
    result = acc.to(out.dtype.element_ty)
    if RESIDUAL:
        res = tl.load(residual + (offs // N) * stride_rm + col * stride_rn, mask=ok, other=0.0)
        result = (res.to(tl.float32) + result.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + (offs // N) * stride_om + col * stride_on, result, mask=ok)
