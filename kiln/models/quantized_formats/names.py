"""Checkpoint tensor names -> the loaded model's parameter names, renamed as transformers renames them.

transformers 5 renames checkpoint keys while loading (a LLaVA saved as `language_model.model.layers.0...`
loads as `model.language_model.layers.0...`); a reader keys its weights by the checkpoint's module names,
so they are put through the same renamings before they meet the model.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError


def model_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Each checkpoint weight name -> the parameter transformers loads it into (names it does not rename map
    to themselves). A weight transformers would convert (fuse, split) rather than rename is refused."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    if not isinstance(model, PreTrainedModel):
        return {name: name for name in names}
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    params: dict[str, Any] = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    out = {}
    for name in names:
        renamed, converted = rename_source_key(name, renamings, converters, prefix, params)
        if renamed not in params and name in params:  # transformers' own fallback: the name as it is
            renamed, converted = rename_source_key(name, [], [], prefix, params)
        if converted is not None:
            raise UnsupportedQuantizationError(
                f"{name}: transformers merges or splits this weight while loading (pattern {converted}), so its "
                "quantized form has no parameter of its own; pre-quantized checkpoints whose quantized weights "
                "transformers converts (such as per-expert MoE weights it fuses) are not supported"
            )
        out[name] = renamed
    return out


def by_model_names(quantized: QuantizedLinears, model: torch.nn.Module) -> QuantizedLinears:
    """`quantized` keyed by the model's parameter names instead of the checkpoint's."""
    names = model_names(model, list(quantized.weights))
    weights = {names[name]: weight for name, weight in quantized.weights.items()}
    if len(weights) != len(names):
        twice = sorted(n for n in names if list(names.values()).count(names[n]) > 1)
        raise UnsupportedQuantizationError(f"quantized weights {twice[:4]} load into the same parameter")
    return QuantizedLinears(quantized.method, quantized.bits, quantized.group_size, weights)
