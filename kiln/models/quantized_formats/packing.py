"""Layout helpers the format readers share: int32 bit fields, act-order regrouping, kiln's value ranges."""

from __future__ import annotations

import torch

from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError


def unpack_fields(packed: torch.Tensor, bits: int, dim: int, size: int) -> torch.Tensor:
    """Split each int32 along `dim` into 32 // bits unsigned fields, lowest bits first, keeping `size` of them.

    Field i of word w becomes entry w * (32 // bits) + i of `dim` (int32, 0 .. 2**bits - 1).
    """
    if packed.dtype != torch.int32:
        raise UnsupportedQuantizationError(f"packed weights must be int32, found {packed.dtype}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.movedim(dim, -1).unsqueeze(-1)
    fields = (words >> shifts) & ((1 << bits) - 1)
    fields = fields.reshape(*fields.shape[:-2], -1)[..., :size]
    return fields.movedim(-1, dim).contiguous()


def scale_dtype(stored: torch.dtype, model: torch.dtype) -> torch.dtype:
    """Scales stay in the model dtype when stored in it; otherwise float32, which holds fp16/bf16 exactly."""
    return stored if stored == model else torch.float32


def check_groups(name: str, in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise UnsupportedQuantizationError(
            f"{name}: group size {group_size} does not divide its in_features {in_features}"
        )


def act_order(name: str, g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The column order that makes act-order (desc_act) groups contiguous, or None when already in order.

    A stable sort of the group index puts each group's columns together; every group must then hold
    exactly `group_size` columns, which is what a QuantizedWeight's `k // group_size` rule needs.
    """
    k = g_idx.numel()
    perm = torch.sort(g_idx.to(torch.int64), stable=True).indices
    expected = torch.arange(k, dtype=torch.int64) // group_size
    if not torch.equal(g_idx.to(torch.int64)[perm], expected):
        raise UnsupportedQuantizationError(f"{name}: its g_idx does not give every group exactly {group_size} columns")
    return None if torch.equal(perm, torch.arange(k, dtype=torch.int64)) else perm


def kiln_weight(
    values: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    perm: torch.Tensor | None,
    dtype: torch.dtype,
) -> QuantizedWeight:
    """A QuantizedWeight from unsigned stored values [N, K] (0 .. 2**bits - 1) and zero points [N, G].

    int4 keeps the unsigned values and zero points; int8 moves both down by 128 to the signed range
    kiln's int8 values use, and drops zero points that are then all 0 (a symmetric weight).
    """
    sdtype = scale_dtype(scales.dtype, dtype)
    if bits == 8:
        values = values - 128
        zeros = None if zeros is None else zeros - 128
        if zeros is not None and not bool(zeros.any()):
            zeros = None
    if perm is not None:
        values = values[:, perm]
    return QuantizedWeight(
        values=values.to(torch.int8).contiguous(),
        scales=scales.to(sdtype).contiguous(),
        zeros=None if zeros is None else zeros.to(sdtype).contiguous(),
        bits=bits,
        group_size=group_size,
        perm=perm,
    )
