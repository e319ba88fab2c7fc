"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): LLaVA-NeXT's any-resolution images, plus video.

One vision program serves both: for each input row (an image patch or a video frame) it returns the
projected features of every vision row, then those of the rows after the model's spatial pooling
(`vision_resampler`: 2x2 average, max or a learned conv), which a video frame takes, projected too.
Images are packed as LLaVA-NeXT packs them; a video's features are its frames' pooled rows, in order,
with no newline.

The checkpoint's `LlavaNextVideoProcessor` also builds a video processor, which needs torchvision, so
kiln builds it without one and prepares frames with transformers' PIL CLIP image processor given the
video processor's settings (the same steps: shortest edge resized, bicubic, center crop, rescale,
normalize; pixels can differ from torchvision's by rounding); `<video>` expands to the processor's own
count, `frames x rows / 4`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.errors import UnsupportedModelError
from kiln.models.vlm.base import ImageItem, VisionProgram, detach_modules
from kiln.models.vlm.llava import LlavaVision
from kiln.models.vlm.llava_next import LlavaNext
from kiln.models.vlm.llava_onevision import DEFAULT_NUM_FRAMES, OnevisionProcessor
from kiln.models.vlm.processor_videos import ProcessorVideos, features_per_item

PROCESSOR_KEYS = (
    "patch_size",
    "vision_feature_select_strategy",
    "image_token",
    "video_token",
    "num_additional_image_tokens",
)
# LlavaNextVideoVideoProcessor's defaults, where neither a video config nor the image processor names a value
VIDEO_DEFAULTS: dict[str, Any] = {
    "size": {"shortest_edge": 224},
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,  # bicubic
}
FRAME_KEYS = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
              "image_mean", "image_std", "resample", "do_convert_rgb")  # fmt: skip


def frame_processor(video: Mapping[str, Any], image_processor: Any) -> Any:
    """transformers' PIL CLIP image processor with the video processor's settings; where the checkpoint has no
    video_preprocessor_config.json, the image processor's size, crop, mean and std (older checkpoints shared them)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Frames
    except ImportError:  # transformers before the PIL/torchvision split: the plain class is PIL's
        from transformers import CLIPImageProcessor as Frames  # type: ignore[assignment]
    shared = {k: getattr(image_processor, k, None) for k in ("size", "crop_size", "image_mean", "image_std")}
    settings = {**VIDEO_DEFAULTS, **{k: v for k, v in shared.items() if v is not None}} if not video else VIDEO_DEFAULTS
    settings = {**settings, **{k: v for k, v in video.items() if k in FRAME_KEYS and v is not None}}
    return Frames(**settings)


class NextVideoProcessor(OnevisionProcessor):
    """transformers' `LlavaNextVideoProcessor` for text and images, with kiln's frame preparation beside it."""

    processor_class = "LlavaNextVideoProcessor"
    processor_keys = PROCESSOR_KEYS

    def __init__(self, tokenizer: Any, image_processor: Any, settings: Mapping[str, Any], video: Mapping[str, Any]):
        super().__init__(tokenizer, image_processor, settings, video)
        self.frames = frame_processor(self.video, image_processor)

    def video_pixels(self, frames: list[Any]) -> torch.Tensor:
        """[frames, 3, H, W] as the video processor prepares them."""
        return self.frames(list(frames), return_tensors="pt")["pixel_values"]


class NextVideoVision(nn.Module):
    """pixel_values [N, 3, H, W] -> [N, rows + pooled rows, hidden]: projected features, then pooled-then-projected."""

    def __init__(self, image: LlavaVision, pooler: nn.Module) -> None:
        super().__init__()
        self.image = image
        self.pooler = pooler

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.image
        hidden = image.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        selected = [hidden[i][:, 1:] if image.drop_cls else hidden[i] for i in image.layers]
        rows = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
        return torch.cat([image.projector(rows), image.projector(self.pooler(rows))], dim=1)


class LlavaNextVideo(ProcessorVideos, LlavaNext):
    architecture = "LlavaNextVideoForConditionalGeneration"
    notes = "LLaVA-NeXT's any-resolution images and videos (spatially pooled frames); one vision program for both"

    def vision_module(self, model: nn.Module) -> nn.Module:
        cfg: Any = model.config
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"{self.architecture} with vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: "
                "transformers pools video frames on a square grid of rows, which a CLS row breaks; only 'default' runs"
            )
        inner: Any = model.model
        return NextVideoVision(super().vision_module(model), inner.vision_resampler)  # type: ignore[arg-type]

    def detach_vision(self, model: nn.Module) -> None:
        detach_modules(model.model, "vision_tower", "multi_modal_projector", "vision_resampler")  # type: ignore[arg-type]

    def frame_rows(self, config: Any) -> int:
        """Feature rows of one video frame: the vision rows after spatial pooling."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        return (side // config.spatial_pool_stride) ** 2

    def default_max_multimodal_len(self, config: Any, max_batch_size: int) -> int:
        """The larger of one image of the largest grid and one video of the default frame count, per request."""
        video = max_batch_size * DEFAULT_NUM_FRAMES * self.frame_rows(config)
        return max(super().default_max_multimodal_len(config, max_batch_size), video)

    def runtime_config(self, config: Any) -> dict[str, Any]:
        return {
            **super().runtime_config(config),
            "frame_rows": self.frame_rows(config),
            "video_token_id": int(config.video_token_id),
        }

    # ---- run --------------------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        return NextVideoProcessor.from_pretrained(path)

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        per_item = features_per_item(program, items, limit)
        pooled = int(config["frame_rows"])
        images = [k for k, item in enumerate(items) if "video_frames" not in item.tensors]
        out: list[torch.Tensor | None] = [None] * len(items)
        if images:
            packed = self.pack([items[k] for k in images], [per_item[k][:, :-pooled] for k in images], state, config)
            for k, feats in zip(images, packed):
                out[k] = feats
        for k, item in enumerate(items):
            if "video_frames" in item.tensors:
                frames = per_item[k][:, -pooled:]
                out[k] = frames.reshape(-1, frames.shape[-1])
        return [f for f in out if f is not None]
