"""AWQ checkpoints with GEMM packing (AutoAWQ, llm-awq exports), read from raw tensors.

Per linear `<m>` with in_features K, out_features N and group size g (all int32 unless said):
  <m>.qweight [K, N / 8], <m>.qzeros [K / g, N / 8], <m>.scales [K / g, N] (fp16)
Each int32 holds 8 four-bit fields (field i = bits 4i .. 4i+3) of 8 neighbouring output columns,
but not in column order: AWQ packs the even columns of the block first, then the odd ones, so field i
holds column `[0, 2, 4, 6, 1, 3, 5, 7][i]` of its block. Zero points are stored as they are
(no offset): W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError
from kiln.models.quantized_formats.packing import check_groups, kiln_weight, unpack_fields
from kiln.models.quantized_formats.tensors import CheckpointTensors

# The packed field that holds column j of a block of 8 (the inverse of AWQ's packing order).
FIELD_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)
VERSIONS = ("gemm",)


def unpack_awq(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 [R, C / 8] in AWQ order -> int32 [R, C] of 0..15 in column order."""
    fields = unpack_fields(packed, 4, dim=1, size=packed.shape[1] * 8)
    blocks = fields.reshape(fields.shape[0], -1, 8)[:, :, list(FIELD_OF_COLUMN)]
    return blocks.reshape(fields.shape[0], -1)[:, :columns]


@dataclass(frozen=True)
class AwqFormat:
    group_size: int  # -1: one group per output channel
    bits: int = 4

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> AwqFormat:
        version = str(qc.get("version", "gemm")).lower()
        if version not in VERSIONS:
            raise UnsupportedQuantizationError(
                f"AWQ version {version!r} is not supported (kiln reads version {', '.join(VERSIONS)} packing; "
                "re-export the checkpoint with AutoAWQ's GEMM version)"
            )
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        if bits != 4:
            raise UnsupportedQuantizationError(f"AWQ with {bits} bits is not supported (AWQ GEMM is 4-bit)")
        if qc.get("zero_point", True) is False:
            raise UnsupportedQuantizationError("AWQ without zero points (zero_point: false) is not supported")
        return cls(group_size=int(qc.get("group_size", qc.get("q_group_size", 128))))

    def read(self, tensors: CheckpointTensors, dtype: torch.dtype) -> QuantizedLinears:
        weights = {}
        for module in tensors.prefixes("qweight"):
            qweight = tensors.get(f"{module}.qweight")
            scales = tensors.get(f"{module}.scales")
            k, n = qweight.shape[0], scales.shape[1]
            group = k if self.group_size == -1 else self.group_size
            check_groups(f"AWQ {module}", k, group)
            if tuple(scales.shape) != (k // group, n) or qweight.shape[1] * 8 != n:
                raise UnsupportedQuantizationError(
                    f"AWQ {module}: qweight {list(qweight.shape)} and scales {list(scales.shape)} do not match "
                    f"the GEMM layout for group size {group}"
                )
            values = unpack_awq(qweight, n).T
            zeros = unpack_awq(tensors.get(f"{module}.qzeros"), n).T
            weights[f"{module}.weight"] = kiln_weight(values, scales.T, zeros, 4, group, None, dtype)
        return QuantizedLinears("awq", self.bits, self.group_size, weights)
