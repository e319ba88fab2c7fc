"""Phi-4-multimodal's vision LoRA, merged into the language model's weights when the model loads.

transformers' Phi-4-multimodal checkpoint keeps the base weights in its safetensors and each LoRA
adapter in a PEFT folder beside them (`vision-lora/`, `speech-lora/`); the model card loads the vision
adapter for image prompts. kiln builds the vision path, so it merges `vision-lora/` when present
(W += scale * B @ A, scale = lora_alpha / r, or / sqrt(r) with rsLoRA) and so serves every prompt, text
or image, with the vision adapter, as the model card's `set_adapter("vision")` does. The speech adapter
is not used. Adapter options kiln does not merge (DoRA, per-module ranks) and weights that hold
unmerged LoRA tensors are refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.errors import UnsupportedModelError

VISION_ADAPTER = "vision-lora"
ADAPTER_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
UNMERGEABLE = ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "layer_replication")


def refuse_unmerged_weights(path: Path) -> None:
    """A checkpoint whose own weights hold LoRA tensors (`lora_A`, `base_layer`...) is a remote-code export."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            found = next((k for k in handle.keys() if ".lora_" in k or ".base_layer." in k), None)
        if found is not None:
            raise UnsupportedModelError(
                f"{file} holds unmerged LoRA weights ({found}): kiln builds Phi4MultimodalForCausalLM from base "
                f"weights with the vision adapter in {VISION_ADAPTER}/ (PEFT format), as transformers' conversion "
                "writes it; merge the adapters or convert the checkpoint first"
            )


def adapter_scale(config: dict[str, Any]) -> float:
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"{VISION_ADAPTER}/ is a {config['peft_type']} adapter; kiln merges LoRA only")
    unsupported = [k for k in UNMERGEABLE if config.get(k)]
    if unsupported:
        raise UnsupportedModelError(f"{VISION_ADAPTER}/ uses {', '.join(unsupported)}, which kiln does not merge")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A [r, in], B [out, r])."""
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = ADAPTER_KEY.match(key)
        if match is None:
            raise UnsupportedModelError(f"{VISION_ADAPTER}/ holds {key}, which is not a LoRA A or B weight")
        sides.setdefault(match["module"], {})[match["side"]] = value
    missing = [m for m, s in sides.items() if len(s) != 2]
    if missing:
        raise UnsupportedModelError(f"{VISION_ADAPTER}/ has only one of lora_A / lora_B for {missing[0]}")
    return {m: (s["A"], s["B"]) for m, s in sides.items()}


def merge_vision_lora(model: nn.Module, path: Path) -> int:
    """Merge `path/vision-lora` into the model's linears (in place); the number of linears changed."""
    refuse_unmerged_weights(path)
    folder = path / VISION_ADAPTER
    if not (folder / "adapter_config.json").is_file():
        return 0
    from safetensors.torch import load_file

    scale = adapter_scale(json.loads((folder / "adapter_config.json").read_text()))
    modules = dict(model.named_modules())
    pairs = adapter_pairs(load_file(str(folder / "adapter_model.safetensors")))
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear):
                raise UnsupportedModelError(f"{VISION_ADAPTER}/ adapts {name}, which is not a linear of this model")
            delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale
            linear.weight.add_(delta.to(linear.weight.device, linear.weight.dtype))
    return len(pairs)
