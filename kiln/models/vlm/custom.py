"""Engines built with the low-level API (`kiln.build_llm_engine` + `kiln.build_multimodal_engine`).

There is no processor: a request gives its prompt (text or token ids) with the image token once per
image, and each image as the vision program's input tensors (no batch dimension). The prompt's image
token is expanded to the vision program's feature rows per image, recorded at build.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.errors import RequestError
from kiln.models.vlm.base import ImageItem, VisionLanguageFamily, VisionProgram

CUSTOM_ARCHITECTURE = "KilnCustomVisionLanguageModel"


def tensor_digest(tensors: tuple[torch.Tensor, ...]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class CustomVision(VisionLanguageFamily):
    architecture = CUSTOM_ARCHITECTURE
    notes = "built from user modules with kiln.build_llm_engine / kiln.build_multimodal_engine"
    loads_images = False

    def load_processor(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    def prompt_image_token(self, processor: Any) -> str | None:
        return None

    def vision_module(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("custom engines get their vision module from build_multimodal_engine")

    def detach_vision(self, model: nn.Module) -> None:
        """The user's language model holds no vision modules."""

    def process(
        self, processor: Any, prompt: str | list[int], images: list[Any], config: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        ids = list(processor(prompt).input_ids) if isinstance(prompt, str) else list(prompt)
        image_id, per_image = int(config["image_token_id"]), config.get("tokens_per_image")
        if ids.count(image_id) != len(images):
            raise RequestError(
                f"the prompt has {ids.count(image_id)} image token(s) (id {image_id}) for {len(images)} image(s)"
            )
        if images and per_image is None:
            raise RequestError("this engine has no vision program yet: build one with kiln.build_multimodal_engine")
        expanded: list[int] = []
        for t in ids:
            expanded.extend([t] * int(per_image or 0) if t == image_id else [t])
        out: dict[str, torch.Tensor] = {"input_ids": torch.tensor([expanded])}
        for i, image in enumerate(images):
            for j, tensor in enumerate(image if isinstance(image, (tuple, list)) else (image,)):
                out[f"image{i}.input{j}"] = tensor
        return out

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        items: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in processed.items():
            if key.startswith("image"):
                image, name = key.split(".", 1)
                items.setdefault(int(image[5:]), {})[name] = tensor
        return [ImageItem(items[i]) for i in sorted(items)]

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        names = sorted(items[0].tensors)
        stacked = [torch.stack([item.tensors[n] for item in items]) for n in names]
        outs = [program(*(t[i : i + limit] for t in stacked)) for i in range(0, len(items), limit)]
        features = torch.cat(outs)
        return [features[i].reshape(-1, features.shape[-1]) for i in range(len(items))]
