"""What a vision-language family must tell kiln: the base class every family module fills in.

Build time: which modules form the vision program (vision tower + projector), an example input to
export it with a dynamic batch dimension, which modules to detach from the model before the LLM
program is captured, and the language model the LLM program calls with `inputs_embeds`.
Run time: how the processor's output splits into images, how images are batched through the vision
program and turned back into per-image features `[tokens, hidden]`, and the per-token extras
(M-RoPE positions, image blocks that attend bidirectionally).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kiln.errors import RequestError

VisionProgram = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ImageItem:
    """One image after the processor: the tensors its vision-program call needs."""

    tensors: Mapping[str, torch.Tensor]

    def to(self, device: torch.device, dtype: torch.dtype) -> "ImageItem":
        """Floating tensors in the engine's dtype, all on its device."""
        return ImageItem(
            {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in self.tensors.items()}
        )


@dataclass(frozen=True)
class CrossAttentionRows:
    """A prompt's image rows as a decoder's cross-attention reads them."""

    order: torch.Tensor  # [image rows] int64: the feature row (images in prompt order) each encoder position stores
    spans: torch.Tensor  # [prompt_len, 2] int64: each token's (begin, end) of those positions (encdec.mllama)


@dataclass(frozen=True)
class VisionExample:
    """Inputs torch.export traces the vision program with, and their dynamic dimensions."""

    args: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, Any] | None, ...]


class _Detached(nn.Module):
    """Stands where a vision module was, so the LLM program carries none of its weights."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this vision module lives in the engine's vision program, not in the LLM program")


def detach_modules(owner: nn.Module, *names: str) -> None:
    for name in names:
        setattr(owner, name, _Detached())


def run_in_batches(program: VisionProgram, inputs: torch.Tensor, limit: int, *extra: torch.Tensor) -> torch.Tensor:
    """The program over `inputs` in slices of at most `limit` rows along dim 0 (a dimension of size 1 is fine)."""
    outs = [program(inputs[i : i + limit], *extra) for i in range(0, inputs.shape[0], limit)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class VisionLanguageFamily:
    """Defaults fit LLaVA-style models: fixed-size images, features [images, tokens, hidden]."""

    architecture: ClassVar[str] = ""
    notes: ClassVar[str] = ""
    position_rows: ClassVar[int] = 1  # 3 for M-RoPE
    bidirectional_images: ClassVar[bool] = False
    max_images_per_prompt: ClassVar[int | None] = None
    loads_images: ClassVar[bool] = True  # False: images arrive as the vision program's input tensors
    # The processor output keys that belong to images (the rest are text: input_ids, attention_mask...).
    image_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)

    # ---- build ------------------------------------------------------------------------------------

    def image_token_id(self, config: Any) -> int:
        value = getattr(config, "image_token_id", None)
        if value is None:
            value = config.image_token_index
        return int(value)

    def text_config(self, config: Any) -> Any:
        return config.get_text_config()

    def vision_module(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, path: Path) -> None:
        """Changes to the model loaded from checkpoint `path` before anything is captured (Phi-4-multimodal merges
        its vision LoRA); the accuracy check's reference gets them too."""

    def vision_example(self, config: Any, dtype: torch.dtype, device: torch.device, limit: int) -> VisionExample:
        """Two images of the model's size; the image dimension is dynamic up to `limit`."""
        size = self.image_size(config)
        pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return VisionExample((pixels,), ({0: torch.export.Dim("images", min=1, max=max(limit, 2))},))

    def image_size(self, config: Any) -> int:
        return int(config.vision_config.image_size)

    def detach_vision(self, model: nn.Module) -> None:
        """Replace the vision modules by stubs before the LLM program is captured."""
        raise NotImplementedError

    def text_model(self, model: nn.Module) -> nn.Module:
        """The module called with inputs_embeds and position_ids that returns logits."""
        return model

    def vision_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors the eager post-processing needs at run time (saved beside the vision program)."""
        return {}

    def tokens_per_image(self, config: Any) -> int:
        """Feature rows of one image (for a variable count: the rows of one vision-program batch row)."""
        raise NotImplementedError

    def default_max_multimodal_len(self, config: Any, max_batch_size: int) -> int:
        """Feature rows of one largest image per request."""
        return max_batch_size * self.tokens_per_image(config)

    def vision_batch_limit(self, config: Any, max_multimodal_len: int) -> int:
        """The largest batch (along the vision program's dynamic dimension) it is built for."""
        return max(1, max_multimodal_len // self.tokens_per_image(config))

    # ---- run --------------------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, local_files_only=True)

    def engine_tokenizer(self, tokenizer: Any) -> Any:
        """The tokenizer kiln encodes text prompts with (saved as the engine's tokenizer/)."""
        return tokenizer

    def prompt_image_token(self, processor: Any) -> str | None:
        """The text a prompt carries once per image, or None where the processor adds image tokens itself."""
        return str(processor.image_token)

    def process(
        self, processor: Any, prompt: str | list[int], images: list[Any], config: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        """The processor's output for one prompt and its images (input_ids [1, L] expanded, pixel tensors)."""
        return processor(text=[prompt], images=images or None, return_tensors="pt")

    # ---- video (families that take it override these) ------------------------------------------------

    def video_token_id(self, config: Mapping[str, Any]) -> int | None:
        """The token a video's features stand on (from `runtime_config`'s values), None: no video input."""
        value = config.get("video_token_id")
        return None if value is None else int(value)

    def prompt_video_token(self, processor: Any) -> str | None:
        """The text a prompt carries once per video."""
        return None

    def video_sampling(self, processor: Any) -> tuple[int, int]:
        """(frames sampled from a video by default, the multiple a frame count is rounded to)."""
        return 8, 1

    def process_media(
        self,
        processor: Any,
        prompt: str | list[int],
        images: list[Any],
        videos: list[Any],
        config: Mapping[str, Any],
    ) -> Mapping[str, torch.Tensor]:
        """`process` with videos too (`kiln.runtime.video.VideoClip`s); families without video refuse them."""
        if videos:
            raise RequestError(f"{self.architecture} takes no video input in kiln")
        return self.process(processor, prompt, images, config)

    def split_videos(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        """Per-video inputs of the vision program (encoded by `encode` beside the images)."""
        return []

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        """Per-image inputs from the processor's output for one prompt."""
        pixels = processed["pixel_values"]
        return [ImageItem({"pixel_values": pixels[i]}) for i in range(pixels.shape[0])]

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        """Features [num_tokens, hidden] of each image, in order (`config`: `runtime_config`'s values)."""
        pixels = torch.stack([item.tensors["pixel_values"] for item in items])
        features = run_in_batches(program, pixels, limit)
        return [features[i].reshape(-1, features.shape[-1]) for i in range(len(items))]

    def image_mask(self, ids: torch.Tensor, processed: Mapping[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
        """[prompt_len] bool: the prompt tokens that take image-feature rows, in order."""
        return ids == image_token_id

    def mrope_positions(
        self, prompt_ids: list[int], processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> tuple[torch.Tensor, int]:
        """[3, prompt_len] positions and the offset of generated tokens (M-RoPE families only)."""
        raise NotImplementedError

    def cross_attention_rows(
        self, prompt_ids: list[int], processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> CrossAttentionRows | None:
        """Where the image rows are stored and which of them each token reads (families whose decoder reads the
        prompt: Mllama)."""
        return None

    def runtime_config(self, config: Any) -> dict[str, Any]:
        """Config values the run-time hooks need, stored in the manifest (plain JSON)."""
        return {}
