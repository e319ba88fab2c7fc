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

import torch
import triton

from kiln.kernels.triton.gemv_config import PROLOGUES, GemvConfig, default_config, num_sms, prologue_config
from kiln.kernels.triton.gemv_kernel import _linear_kernel
from kiln.kernels.triton.gemv_launch import (
    Fusion,
    Rope,
    check_bias_residual,
    column_tiles,
    epilogue_config,
    k_splits,
    launch,
    new_output,
    prologue_width,
    split_target,
)
from kiln.kernels.triton.pdl import enabled as pdl_enabled


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
    rope: Rope | None = None,
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
    m = x.shape[0]
    n = weight.shape[0]
    code, k = prologue_width(x, prologue, norm_weight)
    assert weight.shape[1] == k and weight.dtype == x.dtype, (tuple(x.shape), tuple(weight.shape), weight.dtype)
    check_bias_residual(x, n, bias, residual)
    config = config or prologue_config(code, m, n, k, num_sms(x.device))
    config = epilogue_config(config, m, n, k, residual, rope, gated)
    out, done = new_output(x, m, n, k, bias, gated, residual)
    if done:
        return out
    split, k_per_split = k_splits(k, config.block_k, config.split_k)
    target = split_target(out, split)
    n_tiles = column_tiles(n, config.block_n, rope, gated)
    tiles = max(1, min(config.tiles, n_tiles))
    grid = (triton.cdiv(n_tiles, tiles), triton.cdiv(m, config.block_m), split)
    pdl = pdl_enabled(x.device)
    fusion = Fusion(code, norm_weight, eps, bias, residual, rope, gated, constant_weight)
    args = fusion.kernel_args(weight, n, split, pdl) | {
        "x": x,
        "w": weight,
        "out": target,
        "M": m,
        "N": n,
        "K": k,
        "stride_xm": x.stride(0),
        "stride_xk": x.stride(1),
        "stride_wn": weight.stride(0),
        "stride_wk": weight.stride(1),
        "stride_om": target.stride(-2),
        "stride_on": target.stride(-1),
        "stride_os": target.stride(0) if split > 1 else 0,
        "n_tiles": n_tiles,
        "K_PER_SPLIT": k_per_split,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "DOT": config.dot,
        "SWAP": config.swap,
        "EVEN_N": n % config.block_n == 0 and n_tiles % tiles == 0,
        "EVEN_K": k == split * k_per_split,
        "IEEE_DOT": x.dtype == torch.float32,
        "ONE_TILE": split == 1 and k_per_split == config.block_k,
        "TILES": tiles,
    }
    return launch(_linear_kernel, grid, args, out, target, fusion, pdl, config.num_warps, config.num_stages)


__all__ = ["PROLOGUES", "GemvConfig", "default_config", "linear_triton", "num_sms"]
