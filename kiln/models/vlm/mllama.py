"""Mllama (Llama 3.2 Vision, `MllamaForConditionalGeneration`): a tiled vision tower whose rows the text model's
cross-attention layers read (`kiln.models.encdec.mllama`).

The processor splits an image into at most `max_image_tiles` tiles (an aspect-ratio id names the
layout; `aspect_ratio_mask` the real tiles) and keeps one `<|image|>` token in the prompt per image. The
vision program runs the tower and the projector on a batch of images, each `[max_tiles, C, H, W]`, to
`max_tiles x patches` rows: padding tiles too, since prompt tokens before the first image attend to every
row. A request's sequence is one placeholder per row of all its images (the encoder input, whose cross
keys the encoder program stores), then the prompt's tokens, which the decoder runs. The rows are stored
with every image's real tiles first (in prompt order), then the padding tiles, so that the tiles a token
reads (the processor's `cross_attention_mask`: the real tiles of the image before it, or of a run of
adjacent `<|image|>` tokens) are one span of positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kiln.errors import RequestError
from kiln.models.vlm.base import (
    CrossAttentionRows,
    ImageItem,
    VisionExample,
    VisionLanguageFamily,
    VisionProgram,
)

IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


class MllamaVision(nn.Module):
    """pixel_values [N, tiles, C, H, W], aspect_ratio_ids [N], aspect_ratio_mask [N, tiles] -> rows
    [N, tiles * patches, text hidden]."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.vision = model.model.vision_model
        self.projector = model.model.multi_modal_projector

    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        out = self.vision(
            pixel_values=pixel_values[:, None],
            aspect_ratio_ids=aspect_ratio_ids[:, None],
            aspect_ratio_mask=aspect_ratio_mask[:, None],
        ).last_hidden_state  # [N, 1, tiles, patches, vision output]
        rows = self.projector(out)
        return rows.reshape(rows.shape[0], -1, rows.shape[-1])


def _patches_per_tile(vision: Any) -> int:
    return (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1  # and a class token


class Mllama(VisionLanguageFamily):
    architecture = "MllamaForConditionalGeneration"
    notes = "tiled vision rows read by cross-attention layers interleaved in the Llama decoder (Llama 3.2 Vision)"
    image_keys = IMAGE_KEYS
    # `kiln run --check-accuracy`'s transformers reference: its eager attention fails on Mllama's tile mask (5.25)
    reference_attention: ClassVar[str] = "sdpa"

    # ---- build ------------------------------------------------------------------------------------

    def image_token_id(self, config: Any) -> int:
        """The placeholder of an image row (the text model's pad token); the prompt's `<|image|>` stays text."""
        pad = config.text_config.pad_token_id
        return int(pad if pad is not None else 0)

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def vision_module(self, model: nn.Module) -> nn.Module:
        return MllamaVision(model)

    def vision_example(self, config: Any, dtype: torch.dtype, device: torch.device, limit: int) -> VisionExample:
        """Two images at every tile; the second has one padding tile. The image dimension is dynamic."""
        vision = config.vision_config
        tiles, size = int(vision.max_num_tiles), int(vision.image_size)
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(2, tiles, int(vision.num_channels), size, size, generator=gen)
        mask = torch.ones(2, tiles, dtype=torch.int64)
        mask[1, -1] = 0 if tiles > 1 else 1
        ids = torch.tensor([1, 1 if tiles == 1 else 2])
        images = torch.export.Dim("images", min=1, max=max(limit, 2))
        return VisionExample(
            (pixels.to(device, dtype), ids.to(device), mask.to(device)), ({0: images}, {0: images}, {0: images})
        )

    def detach_vision(self, model: nn.Module) -> None:
        """Nothing to detach: the encoder and decoder programs read only the text model's modules."""

    def tokens_per_image(self, config: Any) -> int:
        vision = config.vision_config
        return int(vision.max_num_tiles) * _patches_per_tile(vision)

    def runtime_config(self, config: Any) -> dict[str, Any]:
        return {
            "rows_per_tile": _patches_per_tile(config.vision_config),
            "max_tiles": int(config.vision_config.max_num_tiles),
            "placeholder": self.image_token_id(config),
        }

    # ---- run --------------------------------------------------------------------------------------

    def engine_tokenizer(self, tokenizer: Any) -> Any:
        """Text prompts as `MllamaProcessor` writes one without the BOS text: the BOS first. (A prompt that writes
        the BOS, as the chat template does, gets a second one, as Llama 3.2's own tokenizer adds it there.)"""
        from tokenizers import Tokenizer, processors
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        bos = str(tokenizer.bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, int(tokenizer.bos_token_id))]
        )
        named = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        out = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
        out.chat_template = getattr(tokenizer, "chat_template", None)
        return out

    def process(
        self, processor: Any, prompt: str | list[int], images: list[Any], config: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        if not images:
            return {"input_ids": processor(text=[prompt], return_tensors="pt")["input_ids"]}
        out = processor(text=[prompt], images=[images], return_tensors="pt")
        rows = len(images) * int(config["max_tiles"]) * int(config["rows_per_tile"])
        placeholders = torch.full((rows,), int(config["placeholder"]), dtype=out["input_ids"].dtype)
        return {
            "input_ids": torch.cat([placeholders, out["input_ids"][0]])[None],
            "encoder_rows": torch.tensor(rows),
            "cross_attention_mask": out["cross_attention_mask"],
            **{key: out[key] for key in IMAGE_KEYS},
        }

    def image_mask(self, ids: torch.Tensor, processed: Mapping[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
        """The leading placeholders: one per image row."""
        return torch.arange(ids.shape[0]) < int(processed.get("encoder_rows", 0))

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        count = processed["pixel_values"].shape[1]
        return [ImageItem({key: processed[key][0, i] for key in IMAGE_KEYS}) for i in range(count)]

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        """Each image's rows [max_tiles * patches, hidden], `limit` images at a time."""
        inputs = [torch.stack([item.tensors[key] for item in items]) for key in IMAGE_KEYS]
        rows = torch.cat([program(*(t[i : i + limit] for t in inputs)) for i in range(0, len(items), limit)])
        return list(rows)

    def cross_attention_rows(
        self, prompt_ids: list[int], processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> CrossAttentionRows | None:
        """Every image's real tiles' rows first, then the padding tiles'; per prompt token, the span of the tiles
        its `cross_attention_mask` row names, or (0, -rows) for a token before the first image (transformers
        lets it attend to every row and zeroes its cross-attention feed-forward)."""
        if "cross_attention_mask" not in processed:
            return None
        per_tile = int(config["rows_per_tile"])
        real = processed["aspect_ratio_mask"][0].flatten().bool()  # [images x max_tiles], prompt order
        tiles = torch.cat([torch.nonzero(real).flatten(), torch.nonzero(~real).flatten()])  # stored tile -> tile
        stored = torch.empty_like(tiles)
        stored[tiles] = torch.arange(tiles.shape[0])  # tile -> stored tile
        order = (tiles[:, None] * per_tile + torch.arange(per_tile)).flatten()
        reads = processed["cross_attention_mask"][0].flatten(1).bool()  # [text tokens, images x max_tiles]
        count = reads.sum(1)
        first = torch.where(reads, stored, tiles.shape[0]).amin(1)
        last = torch.where(reads, stored, -1).amax(1) + 1
        if bool(((last - first != count) & (count > 0)).any()):
            raise RequestError("a token of the prompt reads image tiles that kiln cannot store as one span of rows")
        rows = order.shape[0]
        text = torch.where((count > 0)[:, None], torch.stack([first, last], 1) * per_tile, torch.tensor([0, -rows]))
        return CrossAttentionRows(order, torch.cat([torch.zeros(rows, 2, dtype=text.dtype), text]))
