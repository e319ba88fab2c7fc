"""Phi-4-multimodal's image preprocessing without torchvision (what `Phi4MultimodalImageProcessor` computes).

An image is resized (bilinear, antialiased, in uint8 as torchvision does it) to fill a grid of square
crops chosen from its size (at most `dynamic_hd` crops), padded with white to the grid, normalised,
and cut into crops; a global view (the padded image resized to one crop, bicubic) comes first. Each
crop has a patch mask (0 over the padding) and the image's token count follows from the mask:
the global view's rows with a separator after each, one separator, and the useful part of the
crop grid (after 2x2 pooling) with a separator after each row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kiln.errors import RequestError

Layout = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _closest_ratio(aspect: float, ratios: list[tuple[int, int]], width: int, height: int, crop: int) -> tuple[int, int]:
    best, best_diff = (1, 1), float("inf")
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best, best_diff = ratio, diff
        elif diff == best_diff and width * height > 0.5 * crop * crop * ratio[0] * ratio[1]:
            best = ratio
    return best


def crop_layout(height: int, width: int, crop: int, max_crops: int) -> Layout:
    """((columns, rows) of crops, (width, height) resized to, (right, bottom) padding) of one image."""
    cols, rows = math.ceil(width / crop), math.ceil(height / crop)
    if cols * rows > max_crops:
        # the candidate set built in transformers' order (a set's iteration order can depend on it)
        candidates = {
            (i, j)
            for n in range(1, max_crops + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if 1 <= i * j <= max_crops
        }
        ratios = sorted(candidates, key=lambda r: r[0] * r[1])
        cols, rows = _closest_ratio(width / height, ratios, width, height, crop)
    target_w, target_h = crop * cols, crop * rows
    if target_w / width < target_h / height:
        new_w, new_h = target_w, int(height * (target_w / width))
    else:
        new_w, new_h = int(width * (target_h / height)), target_h
    if min(new_h, target_h) < 10 or min(new_w, target_w) < 10:
        raise RequestError(f"an image of {width}x{height} pixels has too extreme an aspect ratio for Phi-4-multimodal")
    return (cols, rows), (new_w, new_h), (target_w - new_w, target_h - new_h)


def crop_mask(layout: Layout, crop: int, patch: int) -> torch.Tensor:
    """[rows * crop / patch, cols * crop / patch] patch mask of the crop grid: 0 over whole padded patches."""
    (cols, rows), _, (pad_w, pad_h) = layout
    side = crop // patch
    mask = torch.ones(side * rows, side * cols)
    if pad_w >= patch:
        mask[:, -(pad_w // patch) :] = 0
    if pad_h >= patch:
        mask[-(pad_h // patch) :, :] = 0
    return mask


def pooled_useful(mask: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of the crop grid's useful part after 2x2 pooling (the mask read at even patches)."""
    pooled = mask[0::2, 0::2]
    return int(pooled[:, 0].sum()), int(pooled[0, :].sum())


def image_token_count(mask: torch.Tensor, side: int) -> int:
    """Feature rows of one image: global view (rows + separators), one separator, the useful grid + separators."""
    pooled = (side + 1) // 2
    rows, cols = pooled_useful(mask)
    return pooled * (pooled + 1) + 1 + rows * (cols + 1)


def resize_bilinear_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's `resize(uint8 [3, h, w], [height, width])` (bilinear, antialias): torch's native uint8 kernel
    where torchvision uses it (a CPU reporting AVX2), else float32, rounded back to uint8."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    batch = image.unsqueeze(0)
    if "AVX2" in torch.backends.cpu.get_cpu_capability():
        out = F.interpolate(batch, size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(batch.float(), size=[height, width], mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().to(torch.uint8)
    return out[0]


def rgb_tensor(image: Any) -> torch.Tensor:
    """A PIL image (or HWC uint8 array) as uint8 [3, h, w] RGB."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.array(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise RequestError("Phi-4-multimodal takes RGB images (PIL images or uint8 [height, width, 3] arrays)")
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Phi4mmImageProcessor:
    """The image processor's settings (from preprocessor_config.json) and its computation."""

    crop: int = 448
    patch: int = 14
    dynamic_hd: int = 36
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Phi4mmImageProcessor":
        size = values.get("size", {"height": cls.crop, "width": cls.crop})
        if size.get("height") != size.get("width"):
            raise ValueError(f"Phi-4-multimodal's image processor takes square crops, not {size}")
        return cls(
            crop=int(size["height"]),
            patch=int(values.get("patch_size", cls.patch)),
            dynamic_hd=int(values.get("dynamic_hd", cls.dynamic_hd)),
            mean=tuple(values.get("image_mean", cls.mean)),  # type: ignore[arg-type]
            std=tuple(values.get("image_std", cls.std)),  # type: ignore[arg-type]
            rescale_factor=float(values.get("rescale_factor", cls.rescale_factor)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "Phi4MultimodalImageProcessor",
            "size": {"height": self.crop, "width": self.crop},
            "patch_size": self.patch,
            "dynamic_hd": self.dynamic_hd,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "rescale_factor": self.rescale_factor,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
        }

    def one(self, image: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]:
        """(crops [1 + grid, 3, crop, crop], masks [1 + grid, side, side], padded (height, width), token count)."""
        pixels = rgb_tensor(image)
        side = self.crop // self.patch
        layout = crop_layout(int(pixels.shape[1]), int(pixels.shape[2]), self.crop, self.dynamic_hd)
        (cols, rows), (new_w, new_h), (pad_w, pad_h) = layout
        mask = crop_mask(layout, self.crop, self.patch)
        resized = F.pad(resize_bilinear_uint8(pixels, new_h, new_w), (0, pad_w, 0, pad_h), value=255)
        scale = 1.0 / self.rescale_factor
        mean = (torch.tensor(self.mean) * scale)[:, None, None]
        std = (torch.tensor(self.std) * scale)[:, None, None]
        hd = (resized.to(torch.float32) - mean) / std
        height, width = int(hd.shape[1]), int(hd.shape[2])
        glob = hd
        if (height, width) != (self.crop, self.crop):
            glob = F.interpolate(hd[None], size=[self.crop, self.crop], mode="bicubic", align_corners=False)[0]
        grid = (
            hd.reshape(3, rows, self.crop, cols, self.crop).permute(1, 3, 0, 2, 4).reshape(-1, 3, self.crop, self.crop)
        )
        masks = mask.reshape(rows, side, cols, side).transpose(1, 2).reshape(-1, side, side)
        crops = torch.cat([glob[None], grid])
        return crops, torch.cat([torch.ones(1, side, side), masks]), (height, width), image_token_count(mask, side)

    def __call__(self, images: list[Any]) -> dict[str, Any]:
        """transformers' output keys: `image_pixel_values` [B, crops, 3, S, S] (zero crops pad an image to the
        batch's most), `image_sizes` [B, 2], `image_attention_mask` [B, crops, S/14, S/14], `num_img_tokens`."""
        done = [self.one(image) for image in images]
        most = max(d[0].shape[0] for d in done)
        pixels = [torch.cat([c, c.new_zeros(most - c.shape[0], *c.shape[1:])]) for c, *_ in done]
        masks = [torch.cat([m, m.new_ones(most - m.shape[0], *m.shape[1:])]) for _, m, *_ in done]
        return {
            "image_pixel_values": torch.stack(pixels),
            "image_sizes": torch.tensor([list(d[2]) for d in done], dtype=torch.long),
            "image_attention_mask": torch.stack(masks),
            "num_img_tokens": [d[3] for d in done],
        }
