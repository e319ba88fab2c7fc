"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-resolution images as a base patch plus grid patches.

The vision program runs the vision tower and projector on patches `[P, 3, H, W]` (P dynamic, P summed
over the images of a batch); packing each image's patches into its feature sequence (unpadding to the
image's aspect ratio, a learned newline after each row) depends on the image size, so it runs
eagerly with transformers' own `pack_image_features` and the saved `image_newline`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from kiln.models.vlm.base import ImageItem, VisionProgram, detach_modules, run_in_batches
from kiln.models.vlm.llava import Llava


class LlavaNext(Llava):
    architecture = "LlavaNextForConditionalGeneration"
    notes = "any-resolution patches, unpadding and image newlines; vision batch counted in patches"
    image_keys = ("pixel_values", "image_sizes")

    def detach_vision(self, model: nn.Module) -> None:
        detach_modules(model.model, "vision_tower", "multi_modal_projector")  # type: ignore[arg-type]

    def vision_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"image_newline": model.model.image_newline}  # type: ignore[union-attr, dict-item]

    def runtime_config(self, config: Any) -> dict[str, Any]:
        return {
            "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
            "image_size": int(config.vision_config.image_size),
            "patch_size": int(config.vision_config.patch_size),
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
        }

    def tokens_per_image(self, config: Any) -> int:
        """Feature rows of one patch: the vision batch limit counts patches."""
        return super().tokens_per_image(config)

    def default_max_multimodal_len(self, config: Any, max_batch_size: int) -> int:
        """One image of the largest grid per request: its grid patches plus the base patch."""
        size = config.vision_config.image_size
        patches = max((h // size) * (w // size) for h, w in config.image_grid_pinpoints) + 1
        return max_batch_size * patches * self.tokens_per_image(config)

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        items = []
        for pixels, size in zip(processed["pixel_values"], processed["image_sizes"]):
            patches = image_size_to_num_patches(
                image_size=size, grid_pinpoints=config["image_grid_pinpoints"], patch_size=config["image_size"]
            )
            items.append(ImageItem({"pixel_values": pixels[:patches], "image_sizes": size}))
        return items

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        patches = torch.cat([item.tensors["pixel_values"] for item in items])
        features = run_in_batches(program, patches, limit)
        per_image = torch.split(features, [item.tensors["pixel_values"].shape[0] for item in items])
        return self.pack(items, list(per_image), state, config)

    def pack(
        self,
        items: list[ImageItem],
        per_image: list[torch.Tensor],
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        """Each image's patch features [patches, rows, hidden] packed into its feature sequence."""
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        # transformers' own packing, given the config values it reads
        owner = SimpleNamespace(
            config=SimpleNamespace(
                image_grid_pinpoints=config["image_grid_pinpoints"],
                vision_config=SimpleNamespace(image_size=config["image_size"], patch_size=config["patch_size"]),
            )
        )
        sizes = torch.stack([item.tensors["image_sizes"] for item in items])
        packed, _ = LlavaNextModel.pack_image_features(
            owner,  # type: ignore[arg-type]
            per_image,
            sizes,
            config["vision_feature_select_strategy"],
            image_newline=state["image_newline"],
        )
        return list(packed)
