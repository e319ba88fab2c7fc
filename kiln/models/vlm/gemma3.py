"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower, pooled and projected to `mm_tokens_per_image` rows.

A prompt carries `<start_of_image>` once per image; the processor expands it to the image's soft tokens
between begin/end markers. The tokens of one image attend to each other bidirectionally (transformers
ORs a block mask into the causal one), so the LLM program takes `attend_end` and prefill never splits
an image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.models.vlm.base import VisionLanguageFamily, detach_modules


class Gemma3Vision(nn.Module):
    """pixel_values [N, 3, H, W] -> [N, mm_tokens_per_image, hidden]."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return self.projector(hidden)


class Gemma3(VisionLanguageFamily):
    architecture = "Gemma3ForConditionalGeneration"
    notes = "SigLIP + pooled projector; an image's tokens attend to each other bidirectionally"
    bidirectional_images = True

    def vision_module(self, model: nn.Module) -> nn.Module:
        inner: Any = model.model
        return Gemma3Vision(inner.vision_tower, inner.multi_modal_projector)

    def detach_vision(self, model: nn.Module) -> None:
        detach_modules(model.model, "vision_tower", "multi_modal_projector")  # type: ignore[arg-type]

    def tokens_per_image(self, config: Any) -> int:
        return int(config.mm_tokens_per_image)

    def prompt_image_token(self, processor: Any) -> str | None:
        return str(processor.boi_token)
