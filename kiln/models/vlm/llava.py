"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower, a feature layer, an MLP projector."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.models.vlm.base import VisionLanguageFamily, detach_modules


class LlavaVision(nn.Module):
    """pixel_values [N, 3, H, W] -> projected features [N, tokens, hidden]."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, layer: int | list[int], strategy: str) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        selected = [hidden[i][:, 1:] if self.drop_cls else hidden[i] for i in self.layers]
        return self.projector(selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1))


class Llava(VisionLanguageFamily):
    architecture = "LlavaForConditionalGeneration"
    notes = "CLIP vision tower + MLP projector; one image = a fixed number of feature tokens"

    def vision_module(self, model: nn.Module) -> nn.Module:
        inner: Any = model.model
        cfg: Any = model.config
        return LlavaVision(
            inner.vision_tower,
            inner.multi_modal_projector,
            cfg.vision_feature_layer,
            cfg.vision_feature_select_strategy,
        )

    def detach_vision(self, model: nn.Module) -> None:
        detach_modules(model.model, "vision_tower", "multi_modal_projector")  # type: ignore[arg-type]

    def tokens_per_image(self, config: Any) -> int:
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side + (0 if config.vision_feature_select_strategy == "default" else 1)
