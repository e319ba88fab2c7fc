"""Pix2Struct and Deplot (`Pix2StructForConditionalGeneration`): variable-resolution patches into an image encoder
whose rows are the encoder output of a T5-style text decoder (`kiln.models.encdec.pix2struct`).

The processor rescales an image so that its rows x columns of patches fit the image processor's
`max_patches` (the checkpoint's preprocessor_config.json), flattens each patch with its row and column
number, and pads to `max_patches` (`attention_mask` 0). The vision program runs the image encoder on
the padded patches with that mask, as transformers does; only the real patches' rows are kept, so a
request's encoder input is one placeholder token (the decoder's pad id) per real patch. A captioning
checkpoint takes an image and no text; a VQA checkpoint (Deplot, `is_vqa`) takes a text prompt that the
processor renders as a header above the image, with transformers' font (read from the Hugging Face cache).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kiln.errors import RequestError
from kiln.models.vlm.base import ImageItem, VisionExample, VisionLanguageFamily, VisionProgram

PATCH_KEYS = ("flattened_patches", "attention_mask")


class Pix2StructVision(nn.Module):
    """flattened_patches [N, P, 2 + patch values], attention_mask [N, P] -> rows [N, P, hidden]."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, flattened_patches: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(flattened_patches=flattened_patches, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state


def _max_patches_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("max_patches", self.image_processor.max_patches)
    return super(type(self), self).__call__(*args, **kwargs)


def patches_from_config(processor: Any) -> None:
    """Make the processor extract the image processor's `max_patches` unless told otherwise.

    `Pix2StructProcessor` passes its own default (2048) over the image processor's configured value;
    the stand-in class keeps the original's name, so the processor saves and loads as before.
    """
    cls = type(processor)
    if cls.__dict__.get("__call__") is _max_patches_call:
        return
    processor.__class__ = type(cls.__name__, (cls,), {"__call__": _max_patches_call, "__module__": cls.__module__})


class Pix2Struct(VisionLanguageFamily):
    architecture = "Pix2StructForConditionalGeneration"
    notes = "variable-resolution patches (max_patches) -> image encoder rows -> T5-style decoder (Pix2Struct, Deplot)"
    max_images_per_prompt: ClassVar[int | None] = 1
    image_keys = PATCH_KEYS

    # ---- build ------------------------------------------------------------------------------------

    def image_token_id(self, config: Any) -> int:
        return int(config.text_config.pad_token_id or 0)

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def vision_module(self, model: nn.Module) -> nn.Module:
        return Pix2StructVision(model)

    def vision_example(self, config: Any, dtype: torch.dtype, device: torch.device, limit: int) -> VisionExample:
        """Two images of 3 x 4 patch positions, the second with two padding patches; images and patches dynamic."""
        vision = config.vision_config
        gen = torch.Generator().manual_seed(0)
        rows, cols = torch.arange(12) // 4 + 1, torch.arange(12) % 4 + 1
        values = torch.randn(2, 12, int(vision.patch_embed_hidden_size), generator=gen)
        patches = torch.cat([torch.stack([rows, cols], -1).float().expand(2, 12, 2), values], -1)
        mask = torch.ones(2, 12)
        patches[1, 10:], mask[1, 10:] = 0.0, 0.0
        images = torch.export.Dim("images", min=1, max=max(limit, 2))
        positions = torch.export.Dim("patches", min=2, max=max(int(vision.seq_len) ** 2, 12))
        return VisionExample(
            (patches.to(device, dtype), mask.to(device, dtype)),
            ({0: images, 1: positions}, {0: images, 1: positions}),
        )

    def detach_vision(self, model: nn.Module) -> None:
        """Nothing to detach: the encoder and decoder programs read only the decoder's modules."""

    def tokens_per_image(self, config: Any) -> int:
        """Rows of one image at most: patch rows and columns are numbered below the vision `seq_len`."""
        return int(config.vision_config.seq_len)

    def runtime_config(self, config: Any) -> dict[str, Any]:
        return {"placeholder": self.image_token_id(config)}

    # ---- run --------------------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        processor = super().load_processor(path)
        patches_from_config(processor)
        return processor

    def prompt_image_token(self, processor: Any) -> str | None:
        return None

    def process(
        self, processor: Any, prompt: str | list[int], images: list[Any], config: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        if len(images) != 1:
            raise RequestError(f"{self.architecture} takes exactly one image per prompt")
        if not isinstance(prompt, str):
            raise RequestError(f"{self.architecture} takes a text prompt, not token ids")
        vqa = bool(processor.image_processor.is_vqa)
        if vqa and not prompt:
            raise RequestError("this Pix2Struct checkpoint answers questions (is_vqa): give a text prompt")
        if not vqa and prompt:
            raise RequestError(
                "this Pix2Struct checkpoint takes an image and no text prompt (the decoder starts alone)"
            )
        try:
            out = processor(images=images, text=prompt or None, return_tensors="pt")
        except OSError as exc:  # the header font is not in the Hugging Face cache
            raise RequestError(
                f"the processor could not render the prompt onto the image ({type(exc).__name__}: {exc}); "
                "transformers' header font must be in the Hugging Face cache (ybelkada/fonts, Arial.TTF)"
            ) from exc
        count = int(out["attention_mask"][0].sum())
        ids = torch.full((1, count), int(config["placeholder"]))
        return {
            "input_ids": ids,
            "flattened_patches": out["flattened_patches"],
            "attention_mask": out["attention_mask"],
        }

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        return [ImageItem({key: processed[key][0] for key in PATCH_KEYS})]

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        """Each image's real patches' rows, the images padded to one patch count and run `limit` at a time."""
        width = max(item.tensors["attention_mask"].shape[0] for item in items)

        def padded(t: torch.Tensor) -> torch.Tensor:
            return nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, width - t.shape[0]))

        patches = torch.stack([padded(item.tensors["flattened_patches"]) for item in items])
        masks = torch.stack([padded(item.tensors["attention_mask"]) for item in items])
        rows = torch.cat([program(patches[i : i + limit], masks[i : i + limit]) for i in range(0, len(items), limit)])
        return [rows[i][masks[i] > 0] for i in range(len(items))]
