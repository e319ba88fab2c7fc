"""Where a quantized linear op finds its CUDA kernel.

`quantized_kernel` is the one entry the ops of `kiln.kernels.linear` call for a packed weight
(`kiln.kernels.quantized_weight`): the result of a kernel that dequantizes in registers, or None
when none applies to these rows, dtypes or device, and the op then runs its reference path
(`dequantize_packed` + the dense op), which is also the CPU path.

One row goes to the GEMV (`kiln.kernels.triton.qgemv`) with every prologue and epilogue fused;
more rows to the tl.dot kernel (`kiln.kernels.triton.qgemm`), with the prologue run before it
(torch's rms_norm, Triton's silu_mul) and rope / gated after it (Triton's rope_ and silu_mul
passes), as the dense ops do at many rows. (The GEMV can hold up to 4 rows, but its [rows,
weight rows, bytes] accumulator compiled to ~165 registers and shared-memory shuffles for sm_90,
where the GEMM's tiles compile to mma with no shuffle.) An act-order weight (perm) stores its columns in group order:
x's columns (and an RMSNorm prologue's weight) are gathered into that order first
(`act_order_inputs`), one small pass, and the kernels run as for any weight. None for: CPU
tensors, x not fp16/bf16, the kernel selection's `linear` = "reference", no triton, or tensors
the kernels do not take (dtypes, layouts, weights of 2**31 bytes or more).
The choice depends on shapes, dtypes and the device only, so it is stable under CUDA graphs.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.kernels.activation_quant import FP8
from kiln.kernels.selection import current
from kiln.kernels.triton_support import KERNEL_DTYPES, triton_importable
from kiln.kernels.w8a8_dispatch import usable as w8a8_usable
from kiln.kernels.w8a8_dispatch import w8a8_linear

GEMV_ROWS = 1  # rows up to which the GEMV runs (see the module docstring)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _usable(
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    prologue: str,
    epilogue: dict[str, Any],
) -> bool:
    if not (flat.is_cuda and flat.dtype in KERNEL_DTYPES and flat.dim() == 2):
        return False
    if not (qweight.is_cuda and qweight.dim() == 2 and qweight.dtype in (torch.int8, torch.uint8)):
        return False
    if qweight.stride(1) != 1:
        return False
    if qweight.numel() >= 2**31 or scales.dim() != 2 or scales.dtype not in SCALE_DTYPES or group_size <= 0:
        return False
    if zeros is not None and (zeros.dtype != scales.dtype or zeros.shape != scales.shape):
        return False
    k = qweight.shape[1] * (2 if qweight.dtype == torch.uint8 else 1)
    if flat.shape[1] != (2 * k if prologue == "silu_mul" else k) or k % group_size:
        return False
    if tuple(scales.shape) != (qweight.shape[0], k // group_size):
        return False
    if perm is not None and not (perm.is_cuda and perm.dim() == 1 and perm.numel() == k and perm.dtype == torch.int64):
        return False
    if bias is not None and (bias.dtype != flat.dtype or bias.dim() != 1):
        return False
    if norm_weight is not None and norm_weight.dim() != 1:
        return False
    residual = epilogue.get("residual")
    if residual is not None and (residual.dtype != flat.dtype or residual.shape != (flat.shape[0], qweight.shape[0])):
        return False
    rope = epilogue.get("rope")
    if rope is not None:
        cos, sin, _ = rope
        head_dim = cos.shape[-1]
        if not (cos.dtype == sin.dtype == flat.dtype and head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0):
            return False
    return current().linear != "reference" and triton_importable()


def quantized_kernel(
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    constant_weight: bool,
    prologue: str,
    norm_weight: torch.Tensor | None,
    eps: float,
    act: tuple[str, torch.Tensor | None] = ("none", None),
    **epilogue: Any,
) -> torch.Tensor | None:
    """x's rows [M, K] through a quantized kernel -> [M, N] (or [M, N / 2] gated), or None.

    prologue: "none" | "rms_norm" | "silu_mul" (then flat is [M, 2K]); epilogue: residual=[M, N] |
    rope=(cos, sin, width) | gated=True, with `kiln.kernels.triton.gemv.linear_triton`'s meaning.
    act: (activations, act_scale) of a W8A8 weight: `kiln.kernels.w8a8_dispatch` runs those."""
    if act[0] != "none" or qweight.dtype == FP8:
        if not w8a8_usable(flat, qweight, scales, zeros, perm, group_size, act[0], epilogue.get("rope")):
            return None
        return w8a8_linear(
            flat, qweight, scales, bias, prologue, norm_weight, eps, act[0], act[1],
            constant_weight=constant_weight, **epilogue,
        )  # fmt: skip
    if not _usable(flat, qweight, scales, zeros, perm, group_size, bias, norm_weight, prologue, epilogue):
        return None
    residual = epilogue.get("residual")
    rope = epilogue.get("rope")
    gated = bool(epilogue.get("gated", False))
    rows = flat.shape[0]
    scales = scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    norm_weight = None if norm_weight is None else norm_weight.contiguous()
    if rope is not None:
        rope = (rope[0].reshape(rows, -1).contiguous(), rope[1].reshape(rows, -1).contiguous(), int(rope[2]))
    if perm is not None:
        flat, norm_weight = act_order_inputs(flat, perm, prologue, norm_weight)
    if prologue == "silu_mul" and flat.stride(1) != 1:
        flat = flat.contiguous()
    if rows <= GEMV_ROWS:
        from kiln.kernels.triton.qgemv import qlinear_gemv

        return qlinear_gemv(
            flat,
            qweight,
            scales,
            zeros,
            group_size,
            bias,
            constant_weight=constant_weight,
            prologue=prologue,
            norm_weight=norm_weight,
            eps=eps,
            residual=residual,
            rope=rope,
            gated=gated,
        )
    return _many_rows(flat, qweight, scales, zeros, group_size, bias, prologue, norm_weight, eps, residual, rope, gated)


def act_order_inputs(
    flat: torch.Tensor, perm: torch.Tensor, prologue: str, norm_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x's rows and the RMSNorm weight in an act-order weight's column order: W[n, perm[k]] is stored at
    column k, so x[:, perm] meets the stored columns in place (both halves of a silu_mul input alike;
    RMSNorm's mean square does not depend on the order)."""
    k = perm.numel()
    index = torch.cat((perm, perm + k)) if prologue == "silu_mul" else perm
    return flat.index_select(1, index), None if norm_weight is None else norm_weight.index_select(0, perm)


def _many_rows(
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    prologue: str,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    rope: tuple[torch.Tensor, torch.Tensor, int] | None,
    gated: bool,
) -> torch.Tensor:
    """The prologue pass, the quantized GEMM (with bias and residual), then the rope / gated pass."""
    from kiln.kernels.triton.qgemm import qlinear_gemm
    from kiln.kernels.triton.rope import rope_
    from kiln.kernels.triton.silu_mul import silu_mul

    if prologue == "silu_mul":
        flat = silu_mul(flat)
    elif prologue == "rms_norm":
        assert norm_weight is not None
        flat = torch.nn.functional.rms_norm(flat, (flat.shape[-1],), norm_weight, eps)
    out = qlinear_gemm(flat, qweight, scales, zeros, group_size, bias, residual=residual)
    if rope is not None:
        rope_(out, rope[0], rope[1], rope[2])
    return silu_mul(out) if gated else out


__all__ = ["GEMV_ROWS", "act_order_inputs", "quantized_kernel"]
