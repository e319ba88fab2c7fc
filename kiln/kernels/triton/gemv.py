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

from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import torch
import triton

from kiln.kernels.triton.gemv_config import (
    PROLOGUE_RMS_NORM,
    PROLOGUE_SILU_MUL,
    PROLOGUES,
    GemvConfig,
    default_config,
    num_sms,
    prologue_config,
)
from kiln.kernels.triton.gemv_kernel import _linear_kernel, _sum_splits_kernel
from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import launch_options

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # a launch configuration (GemvConfig, QGemvConfig)
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
    config = epilogue_config(config, m, n, k, residual, rope, gated)
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
        sum_splits(target, out, bias, residual, pdl)
    return out


def epilogue_config(
    config: C,
    m: int,
    n: int,
    k: int,
    residual: torch.Tensor | None,
    rope: tuple[torch.Tensor, torch.Tensor, int] | None,
    gated: bool,
) -> C:
    """The launch choice a rotary or gated epilogue needs (one row, two column tiles a program, no
    split K), after checking the epilogue's inputs; `config` as it is without one."""
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
    return config


def sum_splits(
    target: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, pdl: bool
) -> None:
    """out = [residual +] the sum of a split-K launch's partial products (target: float32 [split, M, N])
    [+ bias], rounded once to out's dtype (the GEMV's and the quantized kernels' last launch)."""
    split, m, n = target.shape
    _sum_splits_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
        target,
        bias if bias is not None else out,
        out,
        residual if residual is not None else out,
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


__all__ = ["PROLOGUES", "GemvConfig", "default_config", "linear_triton", "num_sms"]
