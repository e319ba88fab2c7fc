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
from kiln.kernels.triton.gemv import epilogue_config, sum_splits
from kiln.kernels.triton.gemv_config import PROLOGUE_RMS_NORM, PROLOGUE_SILU_MUL, PROLOGUES, num_sms
from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import launch_options
from kiln.kernels.triton.qgemv_config import QGemvConfig


def default_config(n: int, k: int, sms: int = 132) -> QGemvConfig:
    """4 weight rows by 2048 bytes a step on 8 warps: 8 KB a step, as the dense one-row kernel's tuned
    2 x 2048 bf16 tile (16 bytes a thread and load; about 60 registers, no spills, sm_90 compile). K split
    in powers of two while the programs do not fill the SMs twice and each split keeps 4 steps.
    Not yet timed on a GPU."""
    block_k = min(2048, max(16, triton.next_power_of_2(max(k, 1))))
    programs = triton.cdiv(n, 4)
    split = 1
    while programs * split < 2 * sms and k // (split * 2) >= 4 * block_k:
        split *= 2
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
    rope: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """[residual +] prologue(x) [M, K] @ (qweight[N, K] * scales)^T + bias -> a new [M, N] in x's dtype.

    scales: [N, 1] (per output channel, or a per-tensor scale repeated), or [N, K / G] for groups of G
    columns, G a power of two (block-wise FP8 checkpoints, `kiln.models.quantized_formats.fp8`).

    prologue / residual / rope / gated / constant_weight: as `linear_triton`. One row a program
    (config.block_m is ignored): meant for M = 1."""
    m, k = x.shape
    code = PROLOGUES[prologue]
    if code == PROLOGUE_SILU_MUL:
        assert k % 2 == 0 and x.stride(1) == 1, (tuple(x.shape), x.stride())
        k //= 2
    if code == PROLOGUE_RMS_NORM:
        assert norm_weight is not None and norm_weight.shape == (k,) and norm_weight.is_contiguous()
    n = qweight.shape[0]
    assert qweight.dtype == FP8 and qweight.shape == (n, k) and qweight.stride(1) == 1, (qweight.dtype, qweight.shape)
    groups = scales.shape[1]
    group = k // max(groups, 1)
    blocks = groups > 1
    assert scales.dim() == 2 and scales.shape[0] == n and group * groups == k, (tuple(scales.shape), k)
    assert not blocks or (group & (group - 1) == 0 and scales.stride(1) == 1), f"groups of {group} columns"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    assert residual is None or (residual.shape == (m, n) and residual.dtype == x.dtype)
    config = config or default_config(n, k, num_sms(x.device))
    config = epilogue_config(config, m, n, k, residual, rope, gated)
    out = torch.empty(m, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    block_k = config.block_k
    split = min(config.split_k, triton.cdiv(k, block_k))
    per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, per_split)  # no empty splits
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    if rope is not None:
        n_tiles = rope[2] // 2 + triton.cdiv(n - rope[2], config.block_n)
    elif gated:
        n_tiles = n // 2
    else:
        n_tiles = triton.cdiv(n, config.block_n)
    pdl = pdl_enabled(x.device)
    _fp8_linear_kernel[(n_tiles, m, split)](
        x,
        qweight,
        scales,
        bias if bias is not None else scales,
        target,
        n,
        k,
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        scales.stride(0),
        target.stride(-2),
        target.stride(-1),
        target.stride(0) if split > 1 else 0,
        residual if residual is not None else scales,
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        norm_weight if norm_weight is not None else scales,
        eps,
        rope[0] if rope is not None else scales,
        rope[1] if rope is not None else scales,
        rope[0].stride(0) if rope is not None else 0,
        rope[1].stride(0) if rope is not None else 0,
        rope[2] // 2 if rope is not None else 0,
        n // 2,
        K_PER_SPLIT=per_split,
        K_PAD=triton.cdiv(k, 256) * 256,
        HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        EVEN_N=n % config.block_n == 0 and rope is None,
        EVEN_K=k == split * per_split,
        SPLIT=split,
        PDL=pdl,
        EARLY_W=pdl and constant_weight,
        PROLOGUE=code,
        RESIDUAL=residual is not None and split == 1,
        ROPE=rope is not None,
        HALF_D=rope[0].shape[-1] // 2 if rope is not None else 1,
        GATED=gated,
        BLOCKS=blocks,
        GROUP=group,
        GPT=max(1, block_k // group) if blocks else 1,
        num_warps=config.num_warps,
        num_stages=1,
        enable_fp_fusion=rope is None,  # the rotary epilogue rounds as the reference (kiln.kernels.triton.rope)
        **launch_options(pdl),
    )
    if split > 1:
        sum_splits(target, out, bias, residual, pdl)
    return out


__all__ = ["default_config", "fp8_linear_gemv"]
