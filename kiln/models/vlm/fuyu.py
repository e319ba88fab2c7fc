"""Fuyu (`FuyuForCausalLM`): image patches go straight through one linear into the language model.

There is no vision tower: the processor resizes and pads an image to its target size, keeps the
patches of the unpadded part (rows x columns of `patch_size` squares) and writes the prompt as one
`|SPEAKER|` token per patch with a `|NEWLINE|` token after each row, then `<s>`, the text and the
begin-of-answer token. The newline tokens are text; each `|SPEAKER|` token takes its patch's row of
the vision program (the linear, dynamic in patches). The processor puts the image first, so a
prompt has at most one image and carries no image token of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from kiln.models.vlm.base import (
    ImageItem,
    VisionExample,
    VisionLanguageFamily,
    VisionProgram,
    detach_modules,
    run_in_batches,
)

# The image processor's default target size (height, width): the largest image in patches.
DEFAULT_IMAGE_SIZE = (1080, 1920)
PATCH_KEYS = ("pixel_values", "image_patches")  # transformers >= 5.23 may name the patches pixel_values


def _patchify(self: Any, image: Any, patch_size: Any = None) -> Any:
    parent = super(type(self), self).patchify_image  # the class this one stands in for
    if not isinstance(image, torch.Tensor):
        return parent(image=image, patch_size=patch_size)
    out = parent(image=image.cpu().numpy(), patch_size=patch_size)
    return out if isinstance(out, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(out))


def patchify_any(image_processor: Any) -> None:
    """Let the image processor's patchify take the torch tensors its own processor hands it.

    The PIL image processor of some transformers releases reshapes with numpy only, while `FuyuProcessor`
    asks it for torch tensors: a torch input goes through numpy and comes back as torch. The stand-in
    class keeps the original's name, so the processor saves and loads as before.
    """
    cls = type(image_processor)
    if cls.__dict__.get("patchify_image") is _patchify:
        return
    image_processor.__class__ = type(cls.__name__, (cls,), {"patchify_image": _patchify, "__module__": cls.__module__})


def image_patches(processed: Mapping[str, Any]) -> torch.Tensor | None:
    """The processor's patches [patches, patch_size * patch_size * channels], under either name."""
    for key in PATCH_KEYS:
        if key in processed:
            value = processed[key]  # [patches, width], [1, patches, width] or a list of such (by release)
            value = (
                torch.cat([v.reshape(-1, v.shape[-1]) for v in value]) if isinstance(value, (list, tuple)) else value
            )
            return value.reshape(-1, value.shape[-1])
    return None


class Fuyu(VisionLanguageFamily):
    architecture = "FuyuForCausalLM"
    notes = "image patches through one linear into the LM (no vision tower); |NEWLINE| tokens end each patch row"
    max_images_per_prompt: ClassVar[int | None] = 1
    image_keys = PATCH_KEYS

    # ---- build ------------------------------------------------------------------------------------

    def vision_module(self, model: nn.Module) -> nn.Module:
        return model.model.vision_embed_tokens  # type: ignore[union-attr, return-value]

    def vision_example(self, config: Any, dtype: torch.dtype, device: torch.device, limit: int) -> VisionExample:
        """Six patches; the patch dimension is dynamic up to `limit`."""
        width = int(config.patch_size) ** 2 * int(config.num_channels)
        patches = torch.randn(6, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return VisionExample((patches,), ({0: torch.export.Dim("patches", min=1, max=max(limit, 6))},))

    def detach_vision(self, model: nn.Module) -> None:
        detach_modules(model.model, "vision_embed_tokens")  # type: ignore[arg-type]

    def tokens_per_image(self, config: Any) -> int:
        """Patches of an image at the image processor's default target size."""
        patch = int(config.patch_size)
        return (DEFAULT_IMAGE_SIZE[0] // patch) * (DEFAULT_IMAGE_SIZE[1] // patch)

    def vision_batch_limit(self, config: Any, max_multimodal_len: int) -> int:
        """In patches: every patch is one feature row."""
        return max(1, max_multimodal_len)

    # ---- run --------------------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        processor = super().load_processor(path)
        patchify_any(processor.image_processor)
        return processor

    def prompt_image_token(self, processor: Any) -> str | None:
        return None

    def process(
        self, processor: Any, prompt: str | list[int], images: list[Any], config: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        if not images:
            return processor(text=[prompt], return_tensors="pt")
        out = dict(processor(text=[prompt], images=images, return_tensors="pt"))
        out["pixel_values"] = image_patches(out)
        return out

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        return [ImageItem({"pixel_values": processed["pixel_values"]})]

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        """Every image's patches through the linear in slices of at most `limit` patches."""
        sizes = [item.tensors["pixel_values"].shape[0] for item in items]
        features = run_in_batches(program, torch.cat([item.tensors["pixel_values"] for item in items]), limit)
        return list(torch.split(features, sizes))
