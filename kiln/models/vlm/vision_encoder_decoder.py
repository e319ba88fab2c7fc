"""`VisionEncoderDecoderModel` with a Donut-Swin image encoder and an mBART/BART decoder (Nougat, Donut).

The image encoder (and `enc_to_dec_proj` when its width differs from the decoder's) is the vision
program; its rows are the request's whole encoder input, so the prompt holds one placeholder token
(the decoder's pad id) per row and no text: the decoder starts from `decoder_start_token_id`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kiln.errors import RequestError
from kiln.models.vlm.base import VisionExample, VisionLanguageFamily


class ImageEncoder(nn.Module):
    """pixel_values [N, 3, H, W] -> rows [N, tokens, decoder width]."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.projection = getattr(model, "enc_to_dec_proj", None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rows = self.encoder(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return rows if self.projection is None else self.projection(rows)


def _height_width(config: Any) -> tuple[int, int]:
    size = config.encoder.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


class VisionEncoderDecoder(VisionLanguageFamily):
    architecture = "VisionEncoderDecoderModel"
    notes = "Donut-Swin image encoder rows into an mBART/BART decoder's cross-attention (Nougat, Donut); no text prompt"
    max_images_per_prompt: ClassVar[int | None] = 1
    vision_attention: ClassVar[str] = "eager"  # Donut-Swin has no SDPA path in transformers

    def image_token_id(self, config: Any) -> int:
        return int(config.pad_token_id if config.pad_token_id is not None else config.decoder.pad_token_id)

    def text_config(self, config: Any) -> Any:
        return config.decoder

    def vision_module(self, model: nn.Module) -> nn.Module:
        return ImageEncoder(model)

    def vision_example(self, config: Any, dtype: torch.dtype, device: torch.device, limit: int) -> VisionExample:
        height, width = _height_width(config)
        pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return VisionExample((pixels,), ({0: torch.export.Dim("images", min=1, max=max(limit, 2))},))

    def detach_vision(self, model: nn.Module) -> None:
        """Nothing to detach: the encoder and decoder programs read only the decoder's modules."""

    def tokens_per_image(self, config: Any) -> int:
        height, width = _height_width(config)
        encoder = config.encoder
        scale = int(encoder.patch_size) * 2 ** (len(encoder.depths) - 1)  # each later Swin stage halves both sides
        return (height // scale) * (width // scale)

    def runtime_config(self, config: Any) -> dict[str, Any]:
        return {"tokens_per_image": self.tokens_per_image(config), "placeholder": self.image_token_id(config)}

    def prompt_image_token(self, processor: Any) -> str | None:
        return None

    def process(
        self, processor: Any, prompt: str | list[int], images: list[Any], config: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        if prompt:
            raise RequestError(f"{self.architecture} takes an image and no text prompt (the decoder starts alone)")
        if len(images) != 1:
            raise RequestError(f"{self.architecture} takes exactly one image per prompt")
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        ids = torch.full((1, int(config["tokens_per_image"])), int(config["placeholder"]))
        return {"input_ids": ids, "pixel_values": pixels}
