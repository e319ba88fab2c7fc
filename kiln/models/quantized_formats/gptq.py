"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum exports), 4 or 8 bits, read from raw tensors.

Per linear `<m>` with in_features K, out_features N, group size g and b bits (p = 32 / b per int32):
  <m>.qweight int32 [K / p, N]: field i (bits b*i ..) of row r is input row r * p + i
  <m>.qzeros  int32 [K / g, N / p]: field i of word c is output column c * p + i
  <m>.scales  [K / g, N] (fp16), <m>.g_idx int32 [K]: the group of each input row
  W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
Checkpoint format `gptq` (v1, the historical one) stores each zero point minus one, so the true zero
is the stored field + 1; `gptq_v2` stores it as it is. With desc_act (act order) g_idx is not sorted:
kiln stores the columns in group order with `perm` (see `packing.act_order`).
GPTQModel's `dynamic` maps module-name regexes to per-module `bits` / `group_size` overrides ("+:" or no
prefix); a "-:" rule leaves a module dense. The first rule whose regex matches the start of a module's
name decides (see `DynamicRules`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError
from kiln.models.quantized_formats.packing import act_order, check_groups, kiln_weight, unpack_fields
from kiln.models.quantized_formats.tensors import CheckpointTensors

BITS = (4, 8)
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # what to add to a stored zero point, by checkpoint format


@dataclass(frozen=True)
class DynamicRules:
    """GPTQModel's `dynamic` config: (quantized?, regex, overrides) in the order the checkpoint lists them."""

    rules: tuple[tuple[bool, re.Pattern[str], dict[str, Any]], ...] = ()

    @classmethod
    def from_config(cls, dynamic: Any) -> DynamicRules:
        if dynamic is None:
            return cls()
        if not isinstance(dynamic, dict):
            raise UnsupportedQuantizationError(f"GPTQ `dynamic` must map module regexes to overrides, got {dynamic!r}")
        rules = []
        for key, overrides in dynamic.items():
            quantized = not key.startswith("-:")
            pattern = key[2:] if key.startswith(("-:", "+:")) else key
            if not isinstance(overrides, dict):
                raise UnsupportedQuantizationError(f"GPTQ `dynamic` rule {key!r}: overrides must be an object")
            try:
                rules.append((quantized, re.compile(pattern), overrides))
            except re.error as err:
                raise UnsupportedQuantizationError(f"GPTQ `dynamic` rule {key!r} is not a regex: {err}") from err
        return cls(tuple(rules))

    def for_module(self, module: str) -> dict[str, Any] | None:
        """The overrides of the first rule matching `module` ({} when none does); None: left dense."""
        for quantized, pattern, overrides in self.rules:
            if pattern.match(module):
                return overrides if quantized else None
        return {}


@dataclass(frozen=True)
class GptqFormat:
    bits: int
    group_size: int  # -1: one group per output channel
    checkpoint_format: str
    dynamic: DynamicRules = field(default_factory=DynamicRules)

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> GptqFormat:
        bits = _bits(qc.get("bits", 4), "GPTQ")
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in ZERO_OFFSET:
            raise UnsupportedQuantizationError(
                f"GPTQ checkpoint format {fmt!r} is not supported (kiln reads {', '.join(ZERO_OFFSET)})"
            )
        group_size = int(qc.get("group_size", 128))
        return cls(bits, group_size, fmt, DynamicRules.from_config(qc.get("dynamic")))

    def read(self, tensors: CheckpointTensors, dtype: torch.dtype) -> QuantizedLinears:
        weights = {}
        for module in tensors.prefixes("qweight"):
            overrides = self.dynamic.for_module(module)
            if overrides is None:
                raise UnsupportedQuantizationError(
                    f"GPTQ {module}: the checkpoint's `dynamic` config leaves it dense, yet it holds {module}.qweight"
                )
            bits = _bits(overrides.get("bits", self.bits), f"GPTQ {module}")
            group_size = int(overrides.get("group_size", self.group_size))
            weights[f"{module}.weight"] = self._linear(tensors, module, bits, group_size, dtype)
        return QuantizedLinears("gptq", self.bits, self.group_size, weights)

    def _linear(
        self, tensors: CheckpointTensors, module: str, bits: int, group_size: int, dtype: torch.dtype
    ) -> QuantizedWeight:
        qweight = tensors.get(f"{module}.qweight")
        scales = tensors.get(f"{module}.scales")
        k, n = qweight.shape[0] * (32 // bits), qweight.shape[1]
        group = k if group_size == -1 else group_size
        check_groups(f"GPTQ {module}", k, group)
        if tuple(scales.shape) != (k // group, n):
            raise UnsupportedQuantizationError(
                f"GPTQ {module}: scales {list(scales.shape)} do not match qweight {list(qweight.shape)} "
                f"for {bits} bits and group size {group}"
            )
        values = unpack_fields(qweight, bits, dim=0, size=k).T
        zeros = unpack_fields(tensors.get(f"{module}.qzeros"), bits, dim=1, size=n).T
        zeros = zeros + ZERO_OFFSET[self.checkpoint_format]
        name = f"{module}.g_idx"
        g_idx = tensors.get(name) if name in tensors else torch.arange(k) // group
        perm = act_order(f"GPTQ {module}", g_idx, group)
        return kiln_weight(values, scales.T, zeros, bits, group, perm, dtype)


def _bits(value: Any, what: str) -> int:
    bits = int(value)
    if bits not in BITS:
        raise UnsupportedQuantizationError(f"{what} with {bits} bits is not supported (kiln reads {BITS})")
    return bits
