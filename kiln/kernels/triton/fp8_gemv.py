"""Triton kernel: `x @ W.T (+ bias)` for one row of x and an FP8 E4M3 weight W with per-row scales.

A decode step reads every weight once for its token row, so FP8 halves a linear's bytes against
bf16. The kernel (`fp8_gemv_kernel`) streams the FP8 bytes, converts them to float32 in registers
and accumulates in float32 against x in its own dtype (fp16/bf16: the weight-only meaning; a W8A8
weight's input quantization is not applied at one row, see `kiln.kernels.w8a8_dispatch`), with the
dense one-row kernel's prologues and epilogues (`kiln.kernels.triton.gemv.linear_triton`'s meaning).
Launch choices (`default_config`) come from shapes alone, so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

from kiln.kernels.activation_quant import FP8
from kiln.kernels.triton.fp8_gemv_kernel import _fp8_linear_kernel
from kiln.kernels.triton.gemv_config import fill_split, num_sms
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
from kiln.kernels.triton.qgemv_config import QGemvConfig


def default_config(n: int, k: int, sms: int = 132) -> QGemvConfig:
    """4 weight rows by 2048 bytes a step on 8 warps: 8 KB a step, as the dense one-row kernel's tuned
    2 x 2048 bf16 tile (16 bytes a thread and load; about 60 registers, no spills, sm_90 compile). K split
    in powers of two while the programs do not fill the SMs twice and each split keeps 4 steps.
    Not yet timed on a GPU."""
    block_k = min(2048, max(16, triton.next_power_of_2(max(k, 1))))
    split = fill_split(triton.cdiv(n, 4), k, block_k, 4, 2 * sms)
    return QGemvConfig(1, 4, block_k, split, 8 if block_k >= 1024 else 4)


def fp8_linear_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: QGemvConfig | None = None,
    constant_weight: bool = False,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    rope: Rope | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """[residual +] prologue(x) [M, K] @ (qweight[N, K] * scales)^T + bias -> a new [M, N] in x's dtype.

    scales: [N, 1] (per output channel, or a per-tensor scale repeated), or [N, K / G] for groups of G
    columns, G a power of two (block-wise FP8 checkpoints, `kiln.models.quantized_formats.fp8`).

    prologue / residual / rope / gated / constant_weight: as `linear_triton`. One row a program
    (config.block_m is ignored): meant for M = 1."""
    m = x.shape[0]
    code, k = prologue_width(x, prologue, norm_weight)
    n = qweight.shape[0]
    assert qweight.dtype == FP8 and qweight.shape == (n, k) and qweight.stride(1) == 1, (qweight.dtype, qweight.shape)
    groups = scales.shape[1]
    group = k // max(groups, 1)
    blocks = groups > 1
    assert scales.dim() == 2 and scales.shape[0] == n and group * groups == k, (tuple(scales.shape), k)
    assert not blocks or (group & (group - 1) == 0 and scales.stride(1) == 1), f"groups of {group} columns"
    check_bias_residual(x, n, bias, residual)
    config = config or default_config(n, k, num_sms(x.device))
    config = epilogue_config(config, m, n, k, residual, rope, gated)
    out, done = new_output(x, m, n, k, bias, gated, residual)
    if done:
        return out
    block_k = config.block_k
    split, per_split = k_splits(k, block_k, config.split_k)
    target = split_target(out, split)
    grid = (column_tiles(n, config.block_n, rope, gated), m, split)
    pdl = pdl_enabled(x.device)
    fusion = Fusion(code, norm_weight, eps, bias, residual, rope, gated, constant_weight)
    args = fusion.kernel_args(scales, n, split, pdl) | {
        "x": x,
        "w": qweight,
        "scales": scales,
        "out": target,
        "N": n,
        "K": k,
        "stride_xm": x.stride(0),
        "stride_xk": x.stride(1),
        "stride_wn": qweight.stride(0),
        "stride_sn": scales.stride(0),
        "stride_om": target.stride(-2),
        "stride_on": target.stride(-1),
        "stride_os": target.stride(0) if split > 1 else 0,
        "K_PER_SPLIT": per_split,
        "K_PAD": triton.cdiv(k, 256) * 256,
        "BLOCK_N": config.block_n,
        "BLOCK_K": block_k,
        "EVEN_N": n % config.block_n == 0 and rope is None,
        "EVEN_K": k == split * per_split,
        "BLOCKS": blocks,
        "GROUP": group,
        "GPT": max(1, block_k // group) if blocks else 1,
    }
    return launch(_fp8_linear_kernel, grid, args, out, target, fusion, pdl, config.num_warps)


__all__ = ["default_config", "fp8_linear_gemv"]
