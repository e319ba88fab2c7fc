"""Phi-4-multimodal (`Phi4MultimodalForCausalLM`), the vision path: HD crops through a SigLIP-style tower.

The processor cuts an image into a global view and a grid of square crops (`phi4mm_images`). The
vision program takes crops `[N, 3, S, S]` with their patch masks `[N, S/p, S/p]` (N dynamic, every
crop of a vision batch at once): patch and position embeddings as transformers computes them from
the mask, the tower's layers up to `feature_layer` (SDPA, padded patches masked as keys), 2x2
average pooling and the projection (up, GELU, down). Placing the rows is per image and runs eagerly,
once per request (`merge_image`): the crop grid's rows, trimmed to the useful part read
from the mask, each row followed by the learned separator `sub_GN`, then `glb_GN`, then the global
view's rows with their separators. The projection is per row, so the separators are projected
once at build (`vision_state`). Audio is not built: the LLM program gets only text and image rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.models.vlm.base import ImageItem, VisionExample, VisionLanguageFamily, VisionProgram, detach_modules
from kiln.models.vlm.phi4mm_lora import merge_vision_lora
from kiln.models.vlm.phi4mm_processor import load_phi4mm_processor, processed

IMAGE_KEYS = ("image_pixel_values", "image_sizes", "image_attention_mask")
MAX_VISION_CROPS = 64  # 65,536 patches a call: more crops only grow the activations (an image's crops may split)


def used_layers(feature_layer: int, num_layers: int) -> int:
    """Tower layers before the hidden state transformers reads (index 0: the embeddings)."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"feature_layer {feature_layer} is outside a tower of {num_layers} layers")
    return index


class Phi4mmVision(nn.Module):
    """(crops [N, 3, S, S], patch masks [N, S/p, S/p] bool) -> projected rows [N, (S/2p)^2, hidden]."""

    def __init__(self, image_embed: Any) -> None:
        super().__init__()
        tower = image_embed.img_processor
        self.embeddings = tower.embeddings
        count = used_layers(int(image_embed.layer_idx), len(tower.encoder.layers))
        self.layers = nn.ModuleList(list(tower.encoder.layers)[:count])
        self.padding = getattr(image_embed, "img_processor_padding", None)
        self.pool = image_embed.image_token_compression
        self.up = image_embed.img_projection_up
        self.down = image_embed.img_projection_down

    def attention(self, attn: Any, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        n, length, _ = hidden.shape
        heads = int(attn.num_heads)
        q, k, v = (
            proj(hidden).view(n, length, heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=attn.scaling)
        return attn.out_proj(out.transpose(1, 2).reshape(n, length, -1))  # type: ignore[no-any-return]

    def forward(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values=pixels, patch_attention_mask=masks)
        keys = masks.reshape(masks.shape[0], 1, 1, -1)
        layer: Any
        for layer in self.layers:
            hidden = hidden + self.attention(layer.self_attn, layer.layer_norm1(hidden), keys)
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        side = masks.shape[-1]
        grid = hidden.reshape(hidden.shape[0], side, side, -1).permute(0, 3, 1, 2)
        if self.padding is not None:
            grid = self.padding(grid)
        pooled = self.pool(grid).permute(0, 2, 3, 1)
        rows = pooled.reshape(pooled.shape[0], -1, pooled.shape[-1])
        return self.project(rows)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(rows)))  # type: ignore[no-any-return]


def merge_image(
    features: torch.Tensor, mask: torch.Tensor, size: torch.Tensor, crop: int, sub: torch.Tensor, glb: torch.Tensor
) -> torch.Tensor:
    """One image's rows in the LM's order from its crops' projected rows [1 + grid, side^2, hidden]."""
    side = int(round(features.shape[1] ** 0.5))
    hidden = features.shape[-1]
    rows, cols = int(size[0]) // crop, int(size[1]) // crop
    glob = torch.cat([features[0].reshape(side, side, hidden), sub.expand(side, 1, hidden)], dim=1)
    grid = features[1 : 1 + rows * cols].reshape(rows, cols, side, side, hidden).transpose(1, 2)
    grid = grid.reshape(rows * side, cols * side, hidden)
    pooled = mask[1 : 1 + rows * cols, 0::2, 0::2].reshape(rows, cols, side, side).transpose(1, 2)
    pooled = pooled.reshape(rows * side, cols * side)
    useful_h, useful_w = int(pooled[:, 0].sum()), int(pooled[0, :].sum())
    grid = torch.cat([grid[:useful_h, :useful_w], sub.expand(useful_h, 1, hidden)], dim=1)
    return torch.cat([grid.reshape(-1, hidden), glb.reshape(1, hidden), glob.reshape(-1, hidden)])


class Phi4Multimodal(VisionLanguageFamily):
    architecture = "Phi4MultimodalForCausalLM"
    notes = "HD crops + global view through a SigLIP-style tower, 2x2 pooling; separators placed per image on the host"
    image_keys = IMAGE_KEYS

    # ---- build ------------------------------------------------------------------------------------

    def image_token_id(self, config: Any) -> int:
        return int(config.vision_config.image_token_id)

    def text_config(self, config: Any) -> Any:
        return config

    def prepare_model(self, model: nn.Module, path: Path) -> None:
        merge_vision_lora(model, path)

    def vision_module(self, model: nn.Module) -> nn.Module:
        return Phi4mmVision(model.model.embed_tokens_extend.image_embed)  # type: ignore[union-attr]

    def vision_example(self, config: Any, dtype: torch.dtype, device: torch.device, limit: int) -> VisionExample:
        """Two crops, the second half padded; the crop dimension is dynamic up to `limit`."""
        vc = config.vision_config
        size, side = int(vc.image_size), int(vc.image_size) // int(vc.patch_size)
        pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        masks = torch.ones(2, side, side, dtype=torch.bool)
        masks[1, side // 2 :] = False
        crops = torch.export.Dim("crops", min=1, max=max(limit, 2))
        return VisionExample((pixels, masks.to(device)), ({0: crops}, {0: crops}))

    def detach_vision(self, model: nn.Module) -> None:
        detach_modules(model.model, "embed_tokens_extend")  # type: ignore[arg-type]

    def vision_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The separators `sub_GN` and `glb_GN`, projected (the projection is per row)."""
        embed: Any = model.model.embed_tokens_extend.image_embed  # type: ignore[union-attr]
        vision = Phi4mmVision(embed)
        with torch.no_grad():
            sub = vision.project(embed.sub_img_feature_extensor.reshape(1, -1))
            glb = vision.project(embed.global_img_feature_extensor.reshape(1, -1))
        return {"sub_GN": sub.reshape(1, 1, -1), "glb_GN": glb.reshape(1, -1)}

    def tokens_per_image(self, config: Any) -> int:
        """Rows of one crop: the vision batch limit counts crops."""
        side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        return ((side + 1) // 2) ** 2

    def default_max_multimodal_len(self, config: Any, max_batch_size: int) -> int:
        """One image of the processor's default 36 crops per request (rows and separators)."""
        pooled = (int(config.vision_config.image_size) // int(config.vision_config.patch_size) + 1) // 2
        return max_batch_size * (pooled * (pooled + 1) + 1 + 36 * pooled * (pooled + 1))

    def vision_batch_limit(self, config: Any, max_multimodal_len: int) -> int:
        """Crops per vision-program call: `max_multimodal_len` over a crop's rows, at most MAX_VISION_CROPS."""
        return max(1, min(MAX_VISION_CROPS, max_multimodal_len // self.tokens_per_image(config)))

    def runtime_config(self, config: Any) -> dict[str, Any]:
        return {"crop_size": int(config.vision_config.crop_size)}

    # ---- run --------------------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        return load_phi4mm_processor(path)

    def process(
        self, processor: Any, prompt: str | list[int], images: list[Any], config: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        if not isinstance(prompt, str):
            return {"input_ids": torch.tensor([prompt], dtype=torch.int64)}
        return processed(processor, prompt, images)

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        crop = int(config["crop_size"])
        items = []
        for pixels, size, mask in zip(*(processed[k] for k in IMAGE_KEYS)):
            crops = 1 + (int(size[0]) // crop) * (int(size[1]) // crop)
            items.append(ImageItem({"pixels": pixels[:crops], "masks": mask[:crops].to(torch.bool), "size": size}))
        return items

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        """Every crop of the images in vision batches of at most `limit` crops, then each image merged."""
        pixels = torch.cat([item.tensors["pixels"] for item in items])
        masks = torch.cat([item.tensors["masks"] for item in items])
        rows = torch.cat([program(pixels[i : i + limit], masks[i : i + limit]) for i in range(0, len(pixels), limit)])
        per_image = torch.split(rows, [item.tensors["pixels"].shape[0] for item in items])
        crop = int(config["crop_size"])
        return [
            merge_image(f, item.tensors["masks"], item.tensors["size"], crop, state["sub_GN"], state["glb_GN"])
            for f, item in zip(per_image, items)
        ]
