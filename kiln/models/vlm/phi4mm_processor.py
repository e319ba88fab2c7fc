"""Phi-4-multimodal's processor for images and text, without torchvision.

transformers' `Phi4MultimodalProcessor` loads only where torchvision is installed (its image processor
is a torchvision one); `load_phi4mm_processor` uses it then, and otherwise this stand-in: the
checkpoint's tokenizer, `Phi4mmImageProcessor` read from the same config, and each image token of the
prompt expanded to the image's token count, as the processor does. It saves the config files it
read unchanged, so an engine's processor/ loads either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kiln.errors import RequestError
from kiln.models.vlm.phi4mm_images import Phi4mmImageProcessor

CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")


def torchvision_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def image_settings(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The image processor's settings: processor_config.json's `image_processor`, else preprocessor_config.json."""
    nested = files.get("processor_config.json", {}).get("image_processor")
    if isinstance(nested, dict):
        return nested
    if "preprocessor_config.json" in files:
        return files["preprocessor_config.json"]
    raise ValueError("no image processor settings (processor_config.json or preprocessor_config.json)")


class Phi4mmProcessor:
    """Tokenizer + torchvision-free image processor, called as transformers' processor is."""

    def __init__(self, tokenizer: Any, images: Phi4mmImageProcessor, files: dict[str, dict[str, Any]]) -> None:
        self.tokenizer = tokenizer
        self.image_processor = images
        self.image_token = str(tokenizer.image_token)
        self.image_token_id = int(tokenizer.image_token_id)
        self.files = files
        self.chat_template = getattr(tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, path: Path) -> "Phi4mmProcessor":
        from transformers import AutoTokenizer

        files = {name: json.loads((path / name).read_text()) for name in CONFIG_FILES if (path / name).is_file()}
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if getattr(tokenizer, "image_token", None) is None:
            raise ValueError(f"the tokenizer in {path} names no image_token")
        return cls(tokenizer, Phi4mmImageProcessor.from_dict(image_settings(files)), files)

    def save_pretrained(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        for name, values in self.files.items():
            (directory / name).write_text(json.dumps(values, indent=2))

    def __call__(self, text: list[str], images: list[Any] | None = None, return_tensors: str = "pt") -> dict[str, Any]:
        (prompt,) = text
        out: dict[str, Any] = {}
        if images:
            out = self.image_processor(images)
            pieces = prompt.split(self.image_token)
            if len(pieces) - 1 != len(images):
                raise RequestError(f"the prompt has {len(pieces) - 1} {self.image_token} for {len(images)} image(s)")
            counts = out.pop("num_img_tokens")
            prompt = pieces[0] + "".join(self.image_token * n + rest for n, rest in zip(counts, pieces[1:]))
        encoded = self.tokenizer([prompt], return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **out}


def load_phi4mm_processor(path: Path) -> Any:
    """transformers' processor where torchvision is installed, else kiln's `Phi4mmProcessor`."""
    if torchvision_present():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, local_files_only=True)
    return Phi4mmProcessor.from_pretrained(path)


def processed(processor: Any, prompt: str, images: list[Any]) -> dict[str, torch.Tensor]:
    """Either processor's output for one prompt: input ids and the image tensors (no `num_img_tokens`)."""
    out = dict(processor(text=[prompt], images=images or None, return_tensors="pt"))
    out.pop("num_img_tokens", None)
    if "input_image_embeds" in out:  # the crops' name in some transformers releases
        out["image_pixel_values"] = out.pop("input_image_embeds")
    return out
