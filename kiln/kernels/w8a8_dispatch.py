"""Where a W8A8 linear (FP8 E4M3 or int8 weight with a quantized input) finds its CUDA GEMM.

The prologue (rms_norm, silu_mul) runs first, then the input is quantized per token or per tensor
(`kiln.kernels.activation_quant`), then one 8-bit GEMM with both scales applied to its float32
sums: `torch._scaled_mm` for FP8 (row-wise scales, any number of rows: it takes M=1 too), and
`torch._int_mm` for int8 (int32 sums, scaled after). Bias, residual, rope and gated run after it.
One row of an FP8 weight (W8A8, weight-only, or block-wise weight-only) goes instead to the Triton FP8 GEMV
(`kiln.kernels.triton.fp8_gemv`) with prologue and epilogues fused; it keeps x in its dtype, so a
W8A8 weight's one-row result skips the input's E4M3 rounding that the many-row path applies (about
2% of an output's size apart: tests/kernels/test_fp8_gemv.py).
None (the caller's reference path) for: CPU tensors, x not fp16/bf16 (FP8 GEMM: not bf16, the only
output of row-wise scaled FP8 GEMMs), grouped or act-order weights, FP8 on a GPU without FP8
(compute capability < 8.9), a weight-only FP8 weight at more than one row, or the kernel
selection's `linear` = "reference".
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.kernels.activation_quant import FP8, quantize_input
from kiln.kernels.selection import current
from kiln.kernels.triton_support import KERNEL_DTYPES, triton_importable

FP8_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` multiplies FP8 (a CUDA GPU of compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


def fp8_refusal(device: torch.device) -> str | None:
    """Why FP8 engines cannot run on `device` (None: they can; the CPU runs them emulated)."""
    if device.type != "cuda" or fp8_supported(device):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (
        f"FP8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {torch.cuda.get_device_name(device)} "
        f"is {major}.{minor}: build without FP8 (--quantization int8_wo, or a bf16 engine)"
    )


def gemv_usable(
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor, Any] | None = None,
) -> bool:
    """Whether one row of an FP8 weight runs the Triton FP8 GEMV: scales per row [N, 1], or per group of
    a power-of-two number of columns [N, K / G] (block-wise FP8 checkpoints, weight-only)."""
    if not (flat.is_cuda and flat.dim() == 2 and flat.shape[0] == 1 and flat.dtype in KERNEL_DTYPES):
        return False
    if not (qweight.dtype == FP8 and qweight.dim() == 2 and qweight.stride(1) == 1 and qweight.numel() < 2**31):
        return False
    n, k = qweight.shape
    if scales.dim() != 2 or scales.shape[0] != n or not scales.is_floating_point() or k % scales.shape[1]:
        return False
    group = k // scales.shape[1]
    if scales.shape[1] > 1 and group & (group - 1):
        return False
    if rope is not None:
        head_dim = rope[0].shape[-1]
        if not (rope[0].dtype == rope[1].dtype == flat.dtype and head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0):
            return False
    return fp8_supported(flat.device) and triton_importable()


def usable(
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    group_size: int,
    activations: str,
    rope: tuple[torch.Tensor, torch.Tensor, Any] | None = None,
) -> bool:
    if zeros is not None or perm is not None or current().linear == "reference":
        return False
    if gemv_usable(flat, qweight, scales, rope):
        return True
    if activations == "none":
        return False
    if not (flat.is_cuda and flat.dtype in KERNEL_DTYPES and qweight.dim() == 2 and qweight.stride(1) == 1):
        return False
    k = qweight.shape[1]
    if group_size != k or tuple(scales.shape) != (qweight.shape[0], 1) or k % 16 or qweight.shape[0] % 16:
        return False
    if qweight.dtype == FP8 and (flat.dtype != torch.bfloat16 or not fp8_supported(flat.device)):
        return False  # row-wise scaled FP8 GEMMs write bf16 only
    return qweight.dtype in (FP8, torch.int8) and current().linear != "reference"


def w8a8_linear(
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    prologue: str,
    norm_weight: torch.Tensor | None,
    eps: float,
    activations: str,
    act_scale: torch.Tensor | None,
    *,
    constant_weight: bool = False,
    **epilogue: Any,
) -> torch.Tensor:
    """x's rows [M, K] (or [M, 2K] for silu_mul) -> [M, N] (or [M, N / 2] gated) in x's dtype."""
    from kiln.kernels import reference

    if gemv_usable(flat, qweight, scales, epilogue.get("rope")):
        return _one_row(flat, qweight, scales, bias, prologue, norm_weight, eps, constant_weight, **epilogue)
    if prologue == "silu_mul":
        flat = reference.silu_mul(flat)
    elif prologue == "rms_norm":
        assert norm_weight is not None
        flat = torch.nn.functional.rms_norm(flat, (flat.shape[-1],), norm_weight, eps)
    xq, x_scales = quantize_input(flat, activations, qweight.dtype, act_scale)
    x_scales = x_scales.contiguous()
    w_scales = scales.float().reshape(1, -1).contiguous()
    if qweight.dtype == FP8:
        out = torch._scaled_mm(xq, qweight.t(), x_scales, w_scales, bias=bias, out_dtype=flat.dtype)
    else:
        sums = torch._int_mm(_pad_rows(xq), qweight.t())[: xq.shape[0]]
        out = (sums.float() * x_scales * w_scales).to(flat.dtype)
        if bias is not None:
            out = out + bias
    residual = epilogue.get("residual")
    if residual is not None:
        out = residual + out
    rope = epilogue.get("rope")
    if rope is not None:
        out = reference.rope(out, rope[0], rope[1], int(rope[2]))
    return reference.silu_mul(out) if epilogue.get("gated") else out


def _one_row(
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    prologue: str,
    norm_weight: torch.Tensor | None,
    eps: float,
    constant_weight: bool,
    **epilogue: Any,
) -> torch.Tensor:
    from kiln.kernels.triton.fp8_gemv import fp8_linear_gemv

    rope = epilogue.get("rope")
    if rope is not None:
        rope = (rope[0].reshape(1, -1).contiguous(), rope[1].reshape(1, -1).contiguous(), int(rope[2]))
    return fp8_linear_gemv(
        flat if prologue != "silu_mul" else flat.contiguous(),
        qweight,
        scales.contiguous(),
        None if bias is None else bias.contiguous(),
        constant_weight=constant_weight,
        prologue=prologue,
        norm_weight=None if norm_weight is None else norm_weight.contiguous(),
        eps=eps,
        residual=epilogue.get("residual"),
        rope=rope,
        gated=bool(epilogue.get("gated", False)),
    )


def _pad_rows(xq: torch.Tensor) -> torch.Tensor:
    """torch._int_mm needs more than 16 rows: pad with zero rows."""
    if xq.shape[0] > 16:
        return xq
    return torch.cat([xq, xq.new_zeros(17 - xq.shape[0], xq.shape[1])])


__all__ = ["FP8_CAPABILITY", "fp8_refusal", "fp8_supported", "gemv_usable", "usable", "w8a8_linear"]
