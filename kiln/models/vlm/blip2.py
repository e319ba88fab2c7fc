"""BLIP-2 (`Blip2ForConditionalGeneration`): ViT -> Q-Former -> projection, into a decoder-only LM (OPT) or,
with a Flan-T5 LM, into the encoder program of an encoder-decoder engine (`kiln.compiler.build_encdec`).

The Q-Former turns an image into `num_query_tokens` feature rows; the processor prepends that many
image tokens to the prompt (the prompt itself carries no image token), so a prompt has at most one image.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from kiln.models.vlm.base import VisionLanguageFamily


class Blip2Vision(nn.Module):
    """pixel_values [N, 3, H, W] -> projected query features [N, num_query_tokens, hidden]."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask, return_dict=True
        ).last_hidden_state
        return self.language_projection(out.to(image_embeds.dtype))  # the Q-Former may be kept in float32


class Blip2(VisionLanguageFamily):
    architecture = "Blip2ForConditionalGeneration"
    notes = "Q-Former query tokens prepended to the prompt; a decoder-only (OPT) or encoder-decoder (Flan-T5) LM"
    max_images_per_prompt: ClassVar[int | None] = 1

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def vision_module(self, model: nn.Module) -> nn.Module:
        return Blip2Vision(model)

    def detach_vision(self, model: nn.Module) -> None:
        """Nothing to detach: the LLM program holds only the language model."""

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.language_model  # type: ignore[return-value]

    def tokens_per_image(self, config: Any) -> int:
        return int(config.num_query_tokens)

    def prompt_image_token(self, processor: Any) -> str | None:
        return None
