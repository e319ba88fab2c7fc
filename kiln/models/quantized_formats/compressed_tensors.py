"""compressed-tensors `pack-quantized` checkpoints (llm-compressor's W4A16 / W8A16), read from raw tensors
(its `float-quantized` FP8 ones: `fp8.CompressedTensorsFp8`).

Per linear `<m>` with in_features K, out_features N, group size g and b bits (p = 32 / b per int32):
  <m>.weight_packed int32 [N, K / p]: field i (bits b*i ..) of word c is input column c * p + i
  <m>.weight_scale [N, K / g] (one column for per-channel), <m>.weight_shape int [2] = (N, K)
  <m>.weight_zero_point int32 [N / p, K / g] (asymmetric only), packed the same way down the rows
  <m>.weight_g_idx int [K] (activation ordering by group only)
The library quantizes to signed values q in [-2**(b-1), 2**(b-1)) and stores q + 2**(b-1) (zero points
too), so a stored field is kiln's unsigned int4 value as it is; symmetric weights have zero point 0,
i.e. stored 2**(b-1). W[n, k] = (q[n, k] - zp[n, k // g]) * s[n, k // g].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError
from kiln.models.quantized_formats.fp8 import CompressedTensorsFp8, check_float_scheme
from kiln.models.quantized_formats.packing import act_order, check_groups, kiln_weight, unpack_fields
from kiln.models.quantized_formats.tensors import CheckpointTensors

FORMATS = ("pack-quantized",)
BITS = (4, 8)
STRATEGIES = ("group", "channel")


def _check_scheme(name: str, scheme: dict[str, Any], fmt: str) -> tuple[int, int]:
    """(bits, group size; -1 per channel) of one config group, or the error saying why kiln cannot read it."""
    weights = scheme.get("weights") or {}
    what = f"compressed-tensors config group {name!r}"
    if fmt not in FORMATS:
        raise UnsupportedQuantizationError(f"{what}: format {fmt!r} is not supported (kiln reads {FORMATS})")
    if scheme.get("input_activations") or scheme.get("output_activations"):
        raise UnsupportedQuantizationError(
            f"{what}: activation quantization is not supported (kiln runs weight-only W4A16 / W8A16)"
        )
    bits, strategy = int(weights.get("num_bits", 0)), weights.get("strategy")
    if weights.get("type") != "int" or bits not in BITS or strategy not in STRATEGIES or weights.get("dynamic"):
        raise UnsupportedQuantizationError(
            f"{what}: weights {weights} are not supported (kiln reads static int{BITS} per group or per channel)"
        )
    return bits, int(weights.get("group_size") or -1) if strategy == "group" else -1


def _is_float(scheme: dict[str, Any], top: str) -> bool:
    return str(scheme.get("format") or top) == "float-quantized" or (scheme.get("weights") or {}).get("type") == "float"


@dataclass(frozen=True)
class CompressedTensorsFormat:
    bits: int
    group_size: int  # -1: per channel

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> CompressedTensorsFormat | CompressedTensorsFp8:
        """The reader of this config: pack-quantized int weights, or float-quantized FP8 (`fp8`)."""
        sparsity = qc.get("sparsity_config") or {}
        if sparsity.get("format") not in (None, "dense"):
            raise UnsupportedQuantizationError(
                f"compressed-tensors sparsity ({sparsity.get('format')}) is not supported"
            )
        if qc.get("transform_config"):
            raise UnsupportedQuantizationError("compressed-tensors transforms (transform_config) are not supported")
        groups = qc.get("config_groups") or {}
        top = str(qc.get("format") or "dense")
        if any(_is_float(g, top) for g in groups.values()):
            modes = {check_float_scheme(f"compressed-tensors config group {n!r}", g) for n, g in groups.items()}
            if len(modes) != 1 or any(str(g.get("format") or top) != "float-quantized" for g in groups.values()):
                raise UnsupportedQuantizationError(
                    "compressed-tensors FP8 with mixed schemes or formats is not supported (kiln reads one "
                    "float-quantized scheme)"
                )
            return CompressedTensorsFp8(modes.pop())
        found = {_check_scheme(name, g, str(g.get("format") or top)) for name, g in groups.items()}
        if len(found) != 1:
            raise UnsupportedQuantizationError(
                f"compressed-tensors with {len(found)} different weight schemes is not supported (kiln reads one)"
            )
        bits, group_size = found.pop()
        return cls(bits=bits, group_size=group_size)

    def read(self, tensors: CheckpointTensors, dtype: torch.dtype) -> QuantizedLinears:
        weights = {}
        half = 1 << (self.bits - 1)
        for module in tensors.prefixes("weight_packed"):
            packed = tensors.get(f"{module}.weight_packed")
            scales = tensors.get(f"{module}.weight_scale")
            n, k = (int(x) for x in tensors.get(f"{module}.weight_shape").tolist())
            group = k if self.group_size == -1 else self.group_size
            check_groups(f"compressed-tensors {module}", k, group)
            if tuple(scales.shape) != (n, k // group) or packed.shape[1] * (32 // self.bits) < k:
                raise UnsupportedQuantizationError(
                    f"compressed-tensors {module}: weight_packed {list(packed.shape)} and weight_scale "
                    f"{list(scales.shape)} do not match int{self.bits} with group size {group} for [{n}, {k}]"
                )
            values = unpack_fields(packed, self.bits, dim=1, size=k)
            name = f"{module}.weight_zero_point"
            if name in tensors:
                zeros = unpack_fields(tensors.get(name), self.bits, dim=0, size=n)
            else:
                zeros = torch.full(scales.shape, half, dtype=torch.int32)
            perm = None
            if f"{module}.weight_g_idx" in tensors:
                perm = act_order(f"compressed-tensors {module}", tensors.get(f"{module}.weight_g_idx"), group)
            weights[f"{module}.weight"] = kiln_weight(values, scales, zeros, self.bits, group, perm, dtype)
        return QuantizedLinears("compressed-tensors", self.bits, self.group_size, weights)
