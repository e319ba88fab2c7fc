"""Triton kernel: `[residual +] x @ W.T (+ bias)` for many rows of x (prefill, large decode batches) and a
packed int8 / int4 weight W, dequantized in registers and multiplied with tl.dot.

Each program owns a [BLOCK_M, BLOCK_N] output tile (grouped along M so neighbouring programs share
weight tiles in L2) and one split of K; per step it reads a [BLOCK_N, BLOCK_K] byte tile of W,
turns it into x's dtype (`qgemv_dequant`: float32 (value - zero) * scale, then rounded, as
`dequantize_packed(..., dtype)` rounds) and adds its products in float32. int4 bytes give two
column tiles (j.. and K/2 + j..), each with its own x tile. With SPLIT > 1 the fp32 partial sums
go through the dense linear's split sum. No perm (act-order): the caller gathers x into the stored column order first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels.triton.gemv_config import num_sms
from kiln.kernels.triton.gemv_launch import k_splits, split_target, sum_splits
from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import handoff, launch_options
from kiln.kernels.triton.qgemv import check_packed
from kiln.kernels.triton.qgemv_dequant import GROUP_SPLIT, dequantize, group_mode, unpack


@dataclass(frozen=True)
class QGemmConfig:
    block_m: int  # >= 16 (tl.dot)
    block_n: int
    block_k: int  # packed bytes per weight row and step
    split_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # output tiles along M visited together


def default_gemm_config(bits: int, m: int, n: int, k: int, sms: int = 132) -> QGemmConfig:
    """Tiles of 16..128 rows by 64 (up to 64 rows) or 128 weight rows, 128 columns per step (int4: 64
    bytes, two column tiles); K split in powers of two while the programs do not cover the SMs
    and each split keeps 4 steps. Not yet tuned on a GPU."""
    block_m = max(16, min(128, triton.next_power_of_2(max(m, 1))))
    block_n = 64 if block_m <= 64 else 128
    row_bytes = k // 2 if bits == 4 else k
    block_k = min(64 if bits == 4 else 128, max(16, triton.next_power_of_2(max(row_bytes, 1))))
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = 1
    while programs * split < sms and row_bytes // (split * 2) >= 4 * block_k:
        split *= 2
    return QGemmConfig(block_m, block_n, block_k, split, 8 if block_m >= 128 else 4, 3)


@triton.jit
def _dot_step(acc, x, w, offs_m, m_ok, cols, limit, stride_xm, stride_xk, IEEE_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    xv = tl.load(
        x + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
        mask=m_ok[:, None] & (cols < limit)[None, :],
        other=0.0,
    )
    wt = tl.trans(w.to(xv.dtype))
    if IEEE_DOT:
        return tl.dot(xv, wt, acc, input_precision="ieee")
    else:
        return tl.dot(xv, wt, acc)


@triton.jit
def _qgemm_kernel(  # type: ignore[no-untyped-def]
    x,
    w,  # packed bytes [N, KB] (uint8)
    scales,
    zeros,
    bias,
    out,  # [M, N] in x's dtype, or [SPLIT, M, N] fp32
    residual,
    M,
    N,
    K,
    KB,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_sn,
    stride_zn,
    stride_om,
    stride_on,
    stride_os,
    stride_rm,
    stride_rn,
    KB_PER_SPLIT: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    MODE: tl.constexpr,
    GPT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_rows = w + offs_n[:, None] * stride_wn
    handoff(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb_begin = pid_k * KB_PER_SPLIT
    for step in range(0, KB_PER_SPLIT, BLOCK_K):
        kb = kb_begin + step
        cols = kb + offs_b
        raw = tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & (cols < KB)[None, :], other=0)
        first, second = unpack(raw, BITS)
        wt = dequantize(
            first, scales, zeros, offs_n, n_ok, kb, cols, K, stride_sn, stride_zn,
            BITS, GROUP, MODE, GPT, HAS_ZEROS, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc = _dot_step(acc, x, wt, offs_m, m_ok, cols, KB, stride_xm, stride_xk, IEEE_DOT)
        if BITS == 4:
            wt = dequantize(
                second, scales, zeros, offs_n, n_ok, KB + kb, KB + cols, K, stride_sn, stride_zn,
                BITS, GROUP, MODE, GPT, HAS_ZEROS, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            acc = _dot_step(acc, x, wt, offs_m, m_ok, KB + cols, K, stride_xm, stride_xk, IEEE_DOT)
    mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT > 1:
        tl.store(out_ptrs + pid_k * stride_os, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        result = acc.to(out.dtype.element_ty)
        if RESIDUAL:
            res = tl.load(residual + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
            result = (res.to(tl.float32) + result.to(tl.float32)).to(out.dtype.element_ty)
        tl.store(out_ptrs, result, mask=mask)


def qlinear_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    config: QGemmConfig | None = None,
) -> torch.Tensor:
    """[residual +] x [M, K] @ W[N, K]^T + bias -> a new [M, N] in x's dtype, for the packed W of
    `kiln.kernels.quantized_weight` (no perm); the product rounded to x's dtype before the residual."""
    m, k = x.shape
    bits = check_packed(qweight, scales, zeros, group_size, k)
    n, row_bytes = qweight.shape
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    assert residual is None or (residual.shape == (m, n) and residual.dtype == x.dtype)
    config = config or default_gemm_config(bits, m, n, k, num_sms(x.device))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out = out.zero_() if bias is None else out.copy_(bias.expand(m, n))
        return out if residual is None else out.add_(residual)
    block_k = config.block_k
    split, per_split = k_splits(row_bytes, block_k, config.split_k)
    mode = group_mode(block_k, row_bytes, group_size)
    target = split_target(out, split)
    wbytes = qweight.view(torch.uint8)
    pdl = pdl_enabled(x.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split)
    _qgemm_kernel[grid](
        x,
        wbytes,
        scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else scales,
        target,
        residual if residual is not None else scales,
        m,
        n,
        k,
        row_bytes,
        x.stride(0),
        x.stride(1),
        wbytes.stride(0),
        scales.stride(0),
        zeros.stride(0) if zeros is not None else 0,
        target.stride(-2),
        target.stride(-1),
        target.stride(0) if split > 1 else 0,
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        KB_PER_SPLIT=per_split,
        BITS=bits,
        GROUP=group_size,
        MODE=mode,
        GPT=block_k // group_size if mode == GROUP_SPLIT else 1,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        RESIDUAL=residual is not None and split == 1,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        GROUP_M=config.group_m,
        SPLIT=split,
        IEEE_DOT=x.dtype == torch.float32,
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(pdl),
    )
    if split > 1:
        sum_splits(target, out, bias, residual, pdl)
    return out


__all__ = ["QGemmConfig", "default_gemm_config", "qlinear_gemm"]
