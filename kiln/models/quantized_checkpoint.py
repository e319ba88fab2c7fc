"""The quantized linears a checkpoint (or a build-time quantizer such as AWQ) supplies.

The model is loaded (and exported) with the dense weights these stand for; the build's
quantization pass then puts each `QuantizedWeight` back in place of its dense weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kiln.kernels.quantized_weight import QuantizedWeight


@dataclass(frozen=True)
class QuantizedLinears:
    method: str  # "awq", "gptq", "compressed-tensors", "int4_awq" (kiln's own search)
    bits: int
    group_size: int  # in_features of the layers for per-channel quantization: see each weight's group_size
    weights: Mapping[str, QuantizedWeight]  # by the dense parameter's name: "model.layers.0.self_attn.q_proj.weight"
