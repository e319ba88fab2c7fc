"""The FP8 one-row linear's Triton kernel (launched by `kiln.kernels.triton.fp8_gemv.fp8_linear_gemv`).

The dense one-row kernel's structure (`kiln.kernels.triton.gemv_kernel`) with the weight read as
FP8 E4M3 bytes: each program owns BLOCK_N weight rows and one split of K, reads them in steps of
BLOCK_K bytes, one step ahead of the arithmetic, converts each byte to float32 in registers and
accumulates value * x in float32 on the CUDA cores. A weight row with one scale (per output channel,
or a per-tensor scale repeated) has it multiply the row's sum once, not each weight; block-wise
scales (BLOCKS: one per group of GROUP columns, as DeepSeek-style 128 x 128 checkpoints) multiply
each weight. x stays in
its own dtype (the weight-only meaning). Prologues and epilogues are the dense kernel's helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.gemv_epilogue import _store_tile, _tile_columns
from kiln.kernels.triton.gemv_kernel import _load_w, _load_x, _prologue, _row_inverse_rms
from kiln.kernels.triton.pdl import handoff


@triton.jit
def _block_scales(  # type: ignore[no-untyped-def]
    scales, offs_n, n_ok, col0, K, stride_sn, GROUP: tl.constexpr, GPT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    """The scales of the tile at column col0 (a multiple of BK): [BN, 1] when it lies in one group of
    GROUP columns, else its GPT whole groups' spread over [BN, BK] (0 past N and K)."""
    group = col0 // GROUP + tl.arange(0, GPT)
    ok = n_ok[:, None] & (group < K // GROUP)[None, :]
    s = tl.load(scales + offs_n[:, None] * stride_sn + group[None, :], mask=ok, other=0.0).to(tl.float32)
    if GPT == 1:
        return s
    else:
        return tl.reshape(tl.broadcast_to(s[:, :, None], (BN, GPT, BK // GPT)), (BN, BK))


@triton.jit
def _fp8_step(  # type: ignore[no-untyped-def]
    acc, wv, x_ptrs, m_ok, k_idx, K, stride_xk, norm_w, inv_rms, eps, scales, offs_n, n_ok, col0, stride_sn,
    PROLOGUE: tl.constexpr, EVEN_K: tl.constexpr, BLOCKS: tl.constexpr, GROUP: tl.constexpr, GPT: tl.constexpr,
):  # fmt: skip
    """acc [BN, BK] + each FP8 weight (as float32; BLOCKS: times its block's scale) times its x column
    (after the prologue).

    x [1, BK] goes through a 1-D view before it meets the weights: then the compiler moves x (2 bytes
    a column, once for BN rows) into the weight tile's layout, not the FP8 tile (16 bytes a thread
    and load) into x's (8 values a thread): sm_90 ttgir, half the shared-memory traffic a step."""
    xv = _load_x(x_ptrs, m_ok, k_idx, K, EVEN_K)
    xv = _prologue(xv, x_ptrs, m_ok, k_idx, K, stride_xk, norm_w, inv_rms, eps, PROLOGUE, EVEN_K, False)
    BK: tl.constexpr = xv.shape[1]
    w = wv.to(tl.float32)
    if BLOCKS:
        w = w * _block_scales(scales, offs_n, n_ok, col0, K, stride_sn, GROUP, GPT, wv.shape[0], BK)
    return acc + w * tl.reshape(xv, (BK,)).to(tl.float32)[None, :]


@triton.jit
def _fp8_linear_kernel(  # type: ignore[no-untyped-def]
    x,
    w,  # float8_e4m3fn [N, K]
    scales,  # [N, 1]: each weight row's scale; BLOCKS: [N, K / GROUP], each group of GROUP columns' scale
    bias,
    out,  # [M, N] in x's dtype ([M, N / 2] GATED), or [SPLIT, M, N] fp32 partial sums when SPLIT > 1
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_sn,
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
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
    K_PAD: tl.constexpr,  # K rounded up to a multiple of 256 (the rms_norm statistics' loop)
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,  # K == SPLIT * K_PER_SPLIT
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    EARLY_W: tl.constexpr,  # the weight is constant: its first tile may be read before the wait
    PROLOGUE: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ROPE: tl.constexpr,
    HALF_D: tl.constexpr,
    GATED: tl.constexpr,
    BLOCKS: tl.constexpr,  # scales per group of GROUP columns (block-wise FP8), not per row
    GROUP: tl.constexpr,
    GPT: tl.constexpr,  # BLOCKS: groups per tile (BLOCK_K // GROUP, or 1 when a group holds whole tiles)
):
    tile = tl.program_id(0)
    offs_m = tl.program_id(1) + tl.arange(0, 1)  # one row a program
    pid_k = tl.program_id(2)
    m_ok = offs_m >= 0
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = pid_k * K_PER_SPLIT
    offs_n = _tile_columns(tile, rope_pairs, half_n, BLOCK_N, ROPE, GATED, HALF_D)
    n_ok = offs_n < N
    w_ptrs = w + offs_n[:, None] * stride_wn + (k_begin + offs_k)[None, :]
    x_ptrs = x + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    if not EARLY_W:
        handoff(PDL)
    wv = _load_w(w_ptrs, n_ok, k_begin + offs_k, K, EVEN_N, EVEN_K)
    if EARLY_W:
        handoff(PDL)
    inv_rms = _row_inverse_rms(x, stride_xm, stride_xk, offs_m, m_ok, K, eps, PROLOGUE == 2, K_PAD, 1, 256)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):  # the next weight tile is read before this one is used
        following = _load_w(w_ptrs + k, n_ok, k_begin + k + offs_k, K, EVEN_N, EVEN_K)
        k_idx = k_begin + k - BLOCK_K + offs_k
        x_tile = x_ptrs + (k - BLOCK_K) * stride_xk
        acc = _fp8_step(
            acc, wv, x_tile, m_ok, k_idx, K, stride_xk, norm_w, inv_rms, eps, scales, offs_n, n_ok,
            k_begin + k - BLOCK_K, stride_sn, PROLOGUE, EVEN_K, BLOCKS, GROUP, GPT,
        )  # fmt: skip
        wv = following
    last = K_PER_SPLIT - BLOCK_K
    x_tile = x_ptrs + last * stride_xk
    k_idx = k_begin + last + offs_k
    acc = _fp8_step(
        acc, wv, x_tile, m_ok, k_idx, K, stride_xk, norm_w, inv_rms, eps, scales, offs_n, n_ok,
        k_begin + last, stride_sn, PROLOGUE, EVEN_K, BLOCKS, GROUP, GPT,
    )  # fmt: skip
    if BLOCKS:
        result = tl.sum(acc, axis=1)[None, :]
    else:
        scale = tl.load(scales + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        result = (tl.sum(acc, axis=1) * scale)[None, :]
    _store_tile(
        result, out, offs_m, offs_n, m_ok, n_ok, tile, pid_k, m_ok, stride_om, stride_on, stride_os,
        bias, residual, stride_rm, stride_rn, cos, sin, stride_cm, stride_sm, rope_pairs,
        HAS_BIAS, SPLIT, ROPE, HALF_D, RESIDUAL, GATED,
    )  # fmt: skip
