"""FP8 (E4M3) checkpoints, read from raw tensors: compressed-tensors `float-quantized` and block-wise FP8.

compressed-tensors FP8 / FP8_DYNAMIC (llm-compressor), per linear `<m>`:
  <m>.weight float8_e4m3fn [N, K], <m>.weight_scale float32 [N, 1] (channel) or [1] (tensor)
  <m>.input_scale float32 [1] (static activations only)
  W = weight * weight_scale; inputs quantized per token (dynamic) or with input_scale (static).
Block-wise FP8 (`quant_method: fp8`, DeepSeek-V3 / Qwen3-FP8), with blocks of bn x bk:
  <m>.weight float8_e4m3fn [N, K], <m>.weight_scale_inv float32 [ceil(N / bn), ceil(K / bk)]
  W[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]
  Its activations (dynamic per group of bk in the original) are kept in the model dtype: kiln runs
  these weights FP8 weight-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.kernels.quantized_weight import FP8, QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError
from kiln.models.quantized_formats.tensors import CheckpointTensors

WEIGHT_STRATEGIES = ("channel", "tensor")
INPUT_STRATEGIES = {("token", True): "dynamic", ("tensor", False): "static"}


def _fp8_values(name: str, values: torch.Tensor) -> torch.Tensor:
    if values.dtype != FP8 or values.dim() != 2:
        raise UnsupportedQuantizationError(f"{name}: expected a float8_e4m3fn [N, K] weight, got {values.dtype}")
    return values.contiguous()


def check_float_scheme(what: str, scheme: dict[str, Any]) -> str:
    """The activations mode ("none", "dynamic", "static") of a compressed-tensors FP8 config group."""
    weights = scheme.get("weights") or {}
    if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
        raise UnsupportedQuantizationError(f"{what}: weights {weights} are not FP8 E4M3")
    if weights.get("strategy") not in WEIGHT_STRATEGIES or weights.get("dynamic"):
        raise UnsupportedQuantizationError(
            f"{what}: FP8 weights with strategy {weights.get('strategy')!r} are not supported "
            f"(kiln reads static FP8 weights per {' or per '.join(WEIGHT_STRATEGIES)})"
        )
    if scheme.get("output_activations"):
        raise UnsupportedQuantizationError(f"{what}: output activation quantization is not supported")
    inputs = scheme.get("input_activations")
    if not inputs:
        return "none"
    mode = INPUT_STRATEGIES.get((inputs.get("strategy"), bool(inputs.get("dynamic"))))
    if inputs.get("type") != "float" or int(inputs.get("num_bits", 0)) != 8 or mode is None:
        raise UnsupportedQuantizationError(
            f"{what}: input activations {inputs} are not supported (kiln reads FP8 per token dynamic, "
            "or per tensor static)"
        )
    return mode


@dataclass(frozen=True)
class CompressedTensorsFp8:
    activations: str  # "none", "dynamic", "static"

    def read(self, tensors: CheckpointTensors, dtype: torch.dtype) -> QuantizedLinears:
        weights = {}
        for module in tensors.prefixes("weight_scale"):
            values = _fp8_values(f"compressed-tensors {module}.weight", tensors.get(f"{module}.weight"))
            n, k = values.shape
            scale = tensors.get(f"{module}.weight_scale").float()
            if scale.numel() not in (1, n):
                raise UnsupportedQuantizationError(
                    f"compressed-tensors {module}: weight_scale {list(scale.shape)} is neither per tensor nor per "
                    f"channel for [{n}, {k}]"
                )
            input_scale = None
            if self.activations == "static":
                input_scale = tensors.get(f"{module}.input_scale").float().reshape(1)
            scales = scale.reshape(-1, 1).expand(n, 1).contiguous()
            weights[f"{module}.weight"] = QuantizedWeight(
                values, scales, None, 8, k, activations=self.activations, input_scale=input_scale
            )
        return QuantizedLinears("compressed-tensors", 8, -1, weights)


@dataclass(frozen=True)
class BlockFp8Format:
    block_n: int
    block_k: int

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> BlockFp8Format:
        block = qc.get("weight_block_size")
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
            raise UnsupportedQuantizationError(
                f"FP8 checkpoint without a weight_block_size (got {block!r}): kiln reads block-wise FP8 "
                "(weight_scale_inv per block) and compressed-tensors FP8"
            )
        if fmt != "e4m3" or qc.get("activation_scheme", "dynamic") != "dynamic":
            raise UnsupportedQuantizationError(
                f"FP8 checkpoint with fmt {fmt!r} and activation_scheme {qc.get('activation_scheme')!r}: "
                "kiln reads e4m3 with dynamic activations"
            )
        return cls(int(block[0]), int(block[1]))

    def read(self, tensors: CheckpointTensors, dtype: torch.dtype) -> QuantizedLinears:
        weights = {}
        for module in tensors.prefixes("weight_scale_inv"):
            values = _fp8_values(f"FP8 {module}.weight", tensors.get(f"{module}.weight"))
            n, k = values.shape
            inv = tensors.get(f"{module}.weight_scale_inv").float()
            blocks = (-(-n // self.block_n), -(-k // self.block_k))
            if tuple(inv.shape) != blocks:
                raise UnsupportedQuantizationError(
                    f"FP8 {module}: weight_scale_inv {list(inv.shape)} does not give blocks of "
                    f"{self.block_n}x{self.block_k} for [{n}, {k}] (expected {list(blocks)})"
                )
            if k % self.block_k:
                raise UnsupportedQuantizationError(
                    f"FP8 {module}: in_features {k} is not a multiple of the block's {self.block_k} columns"
                )
            scales = inv.repeat_interleave(self.block_n, dim=0)[:n].contiguous()
            weights[f"{module}.weight"] = QuantizedWeight(values, scales, None, 8, self.block_k)
        return QuantizedLinears("fp8_block", 8, self.block_k, weights)


__all__ = ["BlockFp8Format", "CompressedTensorsFp8", "check_float_scheme"]
