"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum exports), 4 or 8 bits, read from raw tensors.

Per linear `<m>` with in_features K, out_features N, group size g and b bits (p = 32 / b per int32):
  <m>.qweight int32 [K / p, N]: field i (bits b*i ..) of row r is input row r * p + i
  <m>.qzeros  int32 [K / g, N / p]: field i of word c is output column c * p + i
  <m>.scales  [K / g, N] (fp16), <m>.g_idx int32 [K]: the group of each input row
  W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
Checkpoint format `gptq` (v1, the historical one) stores each zero point minus one, so the true zero
is the stored field + 1; `gptq_v2` stores it as it is. With desc_act (act order) g_idx is not sorted:
kiln stores the columns in group order with `perm` (see `packing.act_order`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError
from kiln.models.quantized_formats.packing import act_order, check_groups, kiln_weight, unpack_fields
from kiln.models.quantized_formats.tensors import CheckpointTensors

BITS = (4, 8)
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # what to add to a stored zero point, by checkpoint format


@dataclass(frozen=True)
class GptqFormat:
    bits: int
    group_size: int  # -1: one group per output channel
    checkpoint_format: str

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> GptqFormat:
        bits = int(qc.get("bits", 4))
        if bits not in BITS:
            raise UnsupportedQuantizationError(f"GPTQ with {bits} bits is not supported (kiln reads {BITS})")
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in ZERO_OFFSET:
            raise UnsupportedQuantizationError(
                f"GPTQ checkpoint format {fmt!r} is not supported (kiln reads {', '.join(ZERO_OFFSET)})"
            )
        return cls(bits=bits, group_size=int(qc.get("group_size", 128)), checkpoint_format=fmt)

    def read(self, tensors: CheckpointTensors, dtype: torch.dtype) -> QuantizedLinears:
        weights = {}
        per = 32 // self.bits
        for module in tensors.prefixes("qweight"):
            qweight = tensors.get(f"{module}.qweight")
            scales = tensors.get(f"{module}.scales")
            k, n = qweight.shape[0] * per, qweight.shape[1]
            group = k if self.group_size == -1 else self.group_size
            check_groups(f"GPTQ {module}", k, group)
            if tuple(scales.shape) != (k // group, n):
                raise UnsupportedQuantizationError(
                    f"GPTQ {module}: scales {list(scales.shape)} do not match qweight {list(qweight.shape)} "
                    f"for {self.bits} bits and group size {group}"
                )
            values = unpack_fields(qweight, self.bits, dim=0, size=k).T
            zeros = unpack_fields(tensors.get(f"{module}.qzeros"), self.bits, dim=1, size=n).T
            zeros = zeros + ZERO_OFFSET[self.checkpoint_format]
            name = f"{module}.g_idx"
            g_idx = tensors.get(name) if name in tensors else torch.arange(k) // group
            perm = act_order(f"GPTQ {module}", g_idx, group)
            weights[f"{module}.weight"] = kiln_weight(values, scales.T, zeros, self.bits, group, perm, dtype)
        return QuantizedLinears("gptq", self.bits, self.group_size, weights)
