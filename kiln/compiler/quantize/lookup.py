"""A program parameter's quantized weight from `QuantizedLinears` (a checkpoint's, or AWQ's), by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kiln.errors import KilnError
from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears

FUSED_FROM = "fused_from"  # placeholder meta of a fused weight: the state-dict names it concatenates
MIN_SHARED_PARTS = 4  # `layers.0.self_attn.q_proj.weight` has 5: enough to name one layer's linear


def find(quantized: QuantizedLinears | None, target: str) -> QuantizedWeight | None:
    """The weight for the program's parameter `target`: its own name or its longest dotted suffix
    (the program's wrappers prefix the model's names: `model.model.layers.0...`), else the one key
    that shares the target's longest tail of at least MIN_SHARED_PARTS names (a VLM's language
    model is exported under other prefixes than the checkpoint's)."""
    if quantized is None:
        return None
    parts = target.split(".")
    for start in range(len(parts)):
        weight = quantized.weights.get(".".join(parts[start:]))
        if weight is not None:
            return weight
    for start in range(len(parts) - MIN_SHARED_PARTS + 1):
        tail = "." + ".".join(parts[start:])
        keys = [key for key in quantized.weights if key.endswith(tail)]
        if len(keys) == 1:
            return quantized.weights[keys[0]]
        if keys:
            return None  # ambiguous (a vision tower's layer of the same name): left dense
    return None


def incompatibility(weights: Sequence[QuantizedWeight]) -> str | None:
    """Why these weights cannot be stacked along N into one (None: they can)."""
    first = weights[0]
    for other in weights[1:]:
        if (other.values.dtype, other.activations) != (first.values.dtype, first.activations):
            return f"{other.values.dtype} ({other.activations}) beside {first.values.dtype} ({first.activations})"
        if (other.bits, other.group_size) != (first.bits, first.group_size):
            return f"bits/group size {other.bits}/{other.group_size} beside {first.bits}/{first.group_size}"
        if (other.zeros is None) != (first.zeros is None):
            return "symmetric beside asymmetric"
        if (other.perm is None) != (first.perm is None) or (
            other.perm is not None and first.perm is not None and not torch.equal(other.perm, first.perm)
        ):
            return "different column orders (act-order)"
    return None


def concat(weights: Sequence[QuantizedWeight], names: Sequence[str]) -> QuantizedWeight:
    """The weights of linears fused along N (fuse_projections' order) as one."""
    if len(weights) == 1:
        return weights[0]
    why = incompatibility(weights)
    if why is not None:
        raise KilnError(f"cannot fuse the quantized weights of {', '.join(names)}: {why}")
    first = weights[0]
    dtype = first.scales.dtype
    return QuantizedWeight(
        torch.cat([w.values for w in weights]),
        torch.cat([w.scales.to(dtype) for w in weights]),
        None if first.zeros is None else torch.cat([w.zeros.to(dtype) for w in weights if w.zeros is not None]),
        bits=first.bits,
        group_size=first.group_size,
        perm=first.perm,
        activations=first.activations,
        input_scale=_shared_input_scale(weights),
    )


def _shared_input_scale(weights: Sequence[QuantizedWeight]) -> torch.Tensor | None:
    """Linears fused along N read one input: one static scale, the largest of theirs (none clips)."""
    scales = [w.input_scale for w in weights if w.input_scale is not None]
    return torch.stack(scales).amax(dim=0) if scales else None


def fusable(quantized: QuantizedLinears | None, targets: Sequence[str]) -> bool:
    """Whether fuse_projections may fuse these parameters: all dense, or all quantized alike."""
    found = [find(quantized, t) for t in targets]
    present = [w for w in found if w is not None]
    if not present:
        return True
    return len(present) == len(found) and incompatibility(present) is None


__all__ = ["FUSED_FROM", "concat", "find", "fusable", "incompatibility"]
