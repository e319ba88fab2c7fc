"""Triton kernel: `x @ weight.T (+ bias)` for a few rows of x, streaming the weight once.

At decode a linear has M = 1..16 rows and is bound by reading its weight [N, K]. Programs are
(TILES blocks of BLOCK_N weight rows, block of BLOCK_M x rows, split of K): each reads its weight
rows once, contiguous along K, block after block, and keeps the few x rows (from L2) beside them.

Two ways to multiply a tile: DOT=False multiplies on the CUDA cores into a [BM, BN, BK] fp32
accumulator reduced once at the end (for one row); DOT=True pads the rows to 16 and
uses tl.dot, with SWAP putting the weight tile on the left (out^T = W x^T) so a 64-row weight
tile fills a Hopper warpgroup MMA. SPLIT > 1 splits K: each split writes fp32 partial sums and
a second kernel adds them (with the bias) in a fixed order, so results do not depend on timing.

Every choice comes from shapes and dtypes (see `default_config`), so a call needs no host
synchronisation and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import handoff, launch_options
from kiln.kernels.triton.rope import rotate_rounded
from kiln.kernels.triton.silu_mul import silu_times


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # rows of x per program: 1 or 2 on the CUDA cores, 16 with tl.dot
    block_n: int  # weight rows (output columns) per program
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    swap: bool = False  # tl.dot with the weight tile as the left operand
    tiles: int = 1  # column tiles (of block_n weight rows) per program, read one after another

    @property
    def dot(self) -> bool:
        return self.block_m >= 16


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a host query, no synchronisation); 132 off the GPU."""
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def default_config(m: int, n: int, k: int, sms: int = 132) -> GemvConfig:
    """The launch for an [m, k] x [n, k]^T product, from the shapes alone (H100 measurements).

    One row runs on the CUDA cores with 2-row x 2048 weight tiles and 8 warps: within 2% of the
    fastest of 30-60 configurations for every Llama-3.2-1B and Llama-3.1-8B projection, timed as
    back-to-back calls in a CUDA graph with programmatic dependent launch (`benchmarks/
    linear_kernels.py --sweep-one-row`; 0.63-1.04 of copy bandwidth, 3-10% faster than the
    earlier 4 x 1024 tiles). Narrower K gets a tile of its own width. More rows pad to 16 for tl.dot with a
    64-row weight tile on the left; K is split in powers of two (at least 4 tiles of K each) while
    the programs do not cover every SM, but only for K >= 4096: at K = 2048 splitting lost.
    """
    if m <= 1:
        return GemvConfig(1, 2, min(2048, max(64, triton.next_power_of_2(k))), 1, 8, 1)
    block_m, block_n, block_k = 16, 64, 128
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = 1
    while k >= 4096 and programs * split < sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return GemvConfig(block_m, block_n, block_k, split, 4, 4, swap=True)


PROLOGUE_NONE = 0
PROLOGUE_SILU_MUL = 1  # x = [gate | up] (2K wide): silu(gate) * up, rounded as transformers rounds
PROLOGUE_RMS_NORM = 2  # x = rms_norm(x) * norm_weight (Llama's RMSNorm, rounded as transformers does)
PROLOGUES = {"none": PROLOGUE_NONE, "silu_mul": PROLOGUE_SILU_MUL, "rms_norm": PROLOGUE_RMS_NORM}


def prologue_config(prologue: int, m: int, n: int, k: int, sms: int = 132) -> GemvConfig:
    """`default_config`, adjusted at one row from a sweep of each Llama-3.2-1B and Llama-3.1-8B
    projection in its step (`benchmarks/step_skeleton.py --sweep`, H100):

    - a norm prologue: the row fits one tile (its statistics come from the tile itself), and each
      program takes two column tiles in turn, normalising x once for both (q/k/v: 108 -> 88 us per
      1B step, 610 -> 576 us per 8B step; gate/up 384 -> 368 us per 1B step);
    - no prologue, K <= 4096 (o_proj): 4 warps, one tile (1B 66 -> 64 us, 8B 394 -> 364 us);
    - no prologue, longer rows (down_proj): two column tiles (1B 192 -> 185 us; 8B within 1%);
    - the activation prologue: 4 weight rows share its 2K-wide input.
    More column tiles per program lost everywhere (4: up to 1.3x slower, 8: up to 2.4x)."""
    config = default_config(m, n, k, sms)
    if m > 1:
        return config
    if prologue == PROLOGUE_NONE:
        return replace(config, num_warps=4) if k <= 4096 else replace(config, tiles=2)
    if prologue == PROLOGUE_RMS_NORM:
        return replace(config, block_k=min(4096, max(64, triton.next_power_of_2(k))), tiles=2)
    if prologue == PROLOGUE_SILU_MUL:
        return replace(config, block_n=4)
    return config


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
def _rotate_pair(result, cos, sin, stride_cm, stride_sm, offs_m, offs_n, m_ok, HALF_D: tl.constexpr):  # type: ignore[no-untyped-def]
    """Rotary embedding of [BLOCK_M, 2] columns (d, d + HALF_D) of one head: x * cos + rotate_half(x) * sin,
    each product rounded to the output dtype and then their sum (as `kiln.kernels.reference.rope`)."""
    j = tl.arange(0, 2)[None, :]
    value = result.to(tl.float32)
    first = tl.sum(tl.where(j == 0, value, 0.0), axis=1)[:, None]
    second = tl.sum(tl.where(j == 1, value, 0.0), axis=1)[:, None]
    rotated = tl.where(j == 0, -second, first)  # rotate_half: [-x2, x1]
    d = (offs_n % (2 * HALF_D))[None, :]
    c = tl.load(cos + offs_m[:, None] * stride_cm + d, mask=m_ok[:, None], other=0.0).to(tl.float32)
    s = tl.load(sin + offs_m[:, None] * stride_sm + d, mask=m_ok[:, None], other=0.0).to(tl.float32)
    return rotate_rounded(value, rotated, c, s, result)


@triton.jit
def _silu_times_up(result):  # type: ignore[no-untyped-def]
    """silu(gate) * up of [BLOCK_M, 2] = (gate, up) columns -> [BLOCK_M], rounded as
    `kiln.kernels.reference.silu_mul` (silu in float32 rounded to the dtype, then the product)."""
    j = tl.arange(0, 2)[None, :]
    value = result.to(tl.float32)
    gate = tl.sum(tl.where(j == 0, value, 0.0), axis=1)
    up = tl.sum(tl.where(j == 1, value, 0.0), axis=1)
    return silu_times(gate, up, result)


@triton.jit
def _tile_columns(  # type: ignore[no-untyped-def]
    tile, rope_pairs, half_n, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, GATED: tl.constexpr, HALF_D: tl.constexpr
):
    """The output columns of column tile `tile`: BLOCK_N consecutive ones; with ROPE, tiles below
    rope_pairs hold a rotated pair (d, d + HALF_D) of one head and the rest plain pairs after them;
    GATED, gate column `tile` and its up column half_n + tile."""
    if ROPE:
        pair = (tile // HALF_D) * (2 * HALF_D) + tile % HALF_D + tl.arange(0, BLOCK_N) * HALF_D
        plain = 2 * rope_pairs + (tile - rope_pairs) * BLOCK_N + tl.arange(0, BLOCK_N)
        return tl.where(tile < rope_pairs, pair, plain)
    elif GATED:
        return tile + tl.arange(0, BLOCK_N) * half_n
    else:
        return tile * BLOCK_N + tl.arange(0, BLOCK_N)


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
    if PROLOGUE == 2 and not ONE_TILE:
        inv_rms = _inverse_rms(x, stride_xm, stride_xk, offs_m, m_ok, K, eps, SPLIT * K_PER_SPLIT, BLOCK_M, BLOCK_K)
    else:
        inv_rms = tl.zeros((BLOCK_M,), dtype=tl.float32)
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
        mask = m_ok[:, None] & n_ok[None, :]
        out_ptrs = out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        if SPLIT > 1:
            tl.store(out_ptrs + pid_k * stride_os, result, mask=mask)
        else:
            if HAS_BIAS:
                result += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            result = result.to(out.dtype.element_ty)
            if ROPE:
                if tile < rope_pairs:
                    result = _rotate_pair(result, cos, sin, stride_cm, stride_sm, offs_m, offs_n, m_ok, HALF_D)
            if RESIDUAL:
                res = tl.load(
                    residual + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0
                )
                result = (res.to(tl.float32) + result.to(tl.float32)).to(out.dtype.element_ty)
            if GATED:
                gated_ptrs = out + offs_m * stride_om + tile * stride_on
                tl.store(gated_ptrs, _silu_times_up(result), mask=m_ok & (tile < n_tiles))
            else:
                tl.store(out_ptrs, result, mask=mask)
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


SUM_BLOCK = 1024


def linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    constant_weight: bool = False,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """[residual +] prologue(x) [M, K] @ weight[N, K]^T + bias[N] -> a new contiguous [M, N] in x's dtype.

    prologue: "none"; "silu_mul" (x is [M, 2K] = [gate | up]: silu(gate) * up); "rms_norm"
    (rms_norm(x, eps) * norm_weight[K]). Each step is rounded to x's dtype as transformers'
    eager modules round it, and so is the residual sum.
    constant_weight: no kernel writes the weight (a model parameter), so under PDL its first
    tile is read before waiting for the previous kernel.
    rope = (cos, sin, rope_width): the first rope_width output columns are heads of head_dim =
    cos.shape[-1] that get rotary embedding with cos/sin [M, head_dim] (`reference.rope`); one row
    only (2-column tiles pairing d with d + head_dim / 2), without a residual.
    gated: the weight is [gate | up] (N = 2 * width): returns silu(gate) * up [M, width] instead
    (`reference.silu_mul` of the product), one row only (2-column tiles pairing j with width + j)."""
    m, k = x.shape
    n = weight.shape[0]
    code = PROLOGUES[prologue]
    if code == PROLOGUE_SILU_MUL:
        assert k % 2 == 0 and x.stride(1) == 1, (tuple(x.shape), x.stride())
        k //= 2
    if code == PROLOGUE_RMS_NORM:
        assert norm_weight is not None and norm_weight.shape == (k,) and norm_weight.is_contiguous()
    assert weight.shape[1] == k and weight.dtype == x.dtype, (tuple(x.shape), tuple(weight.shape), weight.dtype)
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    assert residual is None or (residual.shape == (m, n) and residual.dtype == x.dtype)
    config = config or prologue_config(code, m, n, k, num_sms(x.device))
    if rope is not None:
        cos, sin, rope_width = rope
        half = cos.shape[-1] // 2
        assert m == 1 and residual is None and k > 0, "rope is fused at one row without a residual"
        assert cos.shape == sin.shape == (m, 2 * half) and half > 0 and half & (half - 1) == 0, tuple(cos.shape)
        assert cos.stride(-1) == sin.stride(-1) == 1 and rope_width % (2 * half) == 0 and rope_width <= n
        config = replace(config, block_m=1, block_n=2, split_k=1)
    if gated:
        assert m == 1 and residual is None and rope is None and n % 2 == 0 and k > 0, "gated: one row, [gate | up]"
        config = replace(config, block_m=1, block_n=2, split_k=1)
    out = torch.empty(m, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    split = min(config.split_k, triton.cdiv(k, config.block_k))
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    if rope is not None:
        n_tiles = rope[2] // 2 + triton.cdiv(n - rope[2], config.block_n)
    elif gated:
        n_tiles = n // 2
    else:
        n_tiles = triton.cdiv(n, config.block_n)
    tiles = max(1, min(config.tiles, n_tiles))
    grid = (triton.cdiv(n_tiles, tiles), triton.cdiv(m, config.block_m), split)
    pdl = pdl_enabled(x.device)
    _linear_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        target,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        target.stride(-2),
        target.stride(-1),
        target.stride(0) if split > 1 else 0,
        residual if residual is not None else weight,
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        norm_weight if norm_weight is not None else weight,
        eps,
        rope[0] if rope is not None else weight,
        rope[1] if rope is not None else weight,
        rope[0].stride(0) if rope is not None else 0,
        rope[1].stride(0) if rope is not None else 0,
        rope[2] // 2 if rope is not None else 0,
        n // 2,
        n_tiles,
        K_PER_SPLIT=k_per_split,
        HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT=config.dot,
        SWAP=config.swap,
        EVEN_N=n % config.block_n == 0 and n_tiles % tiles == 0,
        EVEN_K=k == split * k_per_split,
        SPLIT=split,
        IEEE_DOT=x.dtype == torch.float32,
        PDL=pdl,
        EARLY_W=pdl and constant_weight,
        PROLOGUE=code,
        RESIDUAL=residual is not None and split == 1,
        ONE_TILE=split == 1 and k_per_split == config.block_k,
        ROPE=rope is not None,
        HALF_D=rope[0].shape[-1] // 2 if rope is not None else 1,
        GATED=gated,
        TILES=tiles,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        # the rotary epilogue rounds each product and the sum as the reference does: no contraction
        # (see kiln.kernels.triton.rope); the product's own sums are then multiply-adds rounded apart
        enable_fp_fusion=rope is None,
        **launch_options(pdl),
    )
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
            target,
            bias if bias is not None else weight,
            out,
            residual if residual is not None else weight,
            m,
            n,
            out.stride(0),
            out.stride(1),
            residual.stride(0) if residual is not None else 0,
            residual.stride(1) if residual is not None else 0,
            HAS_BIAS=bias is not None,
            RESIDUAL=residual is not None,
            SPLIT=split,
            BLOCK=SUM_BLOCK,
            PDL=pdl,
            num_warps=4,
            **launch_options(pdl),
        )
    return out


__all__ = ["PROLOGUES", "GemvConfig", "default_config", "linear_triton", "num_sms"]
