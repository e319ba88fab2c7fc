"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's any-resolution images, plus video.

The vision program is LLaVA-NeXT's (vision tower + projector over patches `[P, 3, H, W]`); a video's
frames are patches of it too. Packing runs eagerly with transformers' own functions: images with
`pack_image_features` (unpadding, `anyres_max_N` downscaling, newlines), videos with `apply_pooling`
(2x bilinear downscaling of each frame's feature grid) and one newline after the last frame.

The checkpoint's `LlavaOnevisionProcessor` also builds a video processor, which needs torchvision,
so kiln builds that processor without it and prepares videos itself (`OnevisionProcessor`): each
sampled frame resized to the video processor's `size` (PIL bicubic, where the processor uses
torchvision's: pixels can differ by rounding), scaled and normalized; `<video>` expands to
`frames x ceil(side / 2)^2 + 1` tokens, as the processor counts them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from kiln.errors import RequestError
from kiln.models.vlm.base import ImageItem, VisionProgram
from kiln.models.vlm.llava_next import LlavaNext
from kiln.models.vlm.processor_videos import ProcessorVideos, features_per_item

PROCESSOR_CONFIG = "processor_config.json"
VIDEO_CONFIG = "video_preprocessor_config.json"
PROCESSOR_KEYS = (
    "num_image_tokens",
    "vision_feature_select_strategy",
    "vision_aspect_ratio",
    "image_token",
    "video_token",
)
DEFAULT_NUM_FRAMES = 8  # kiln's default when neither the request nor the video config names a count
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def without_video_processor(name: str) -> Any:
    """transformers' processor class `name`, built with no video processor (that one needs torchvision)."""
    import transformers

    class NoVideoProcessor(getattr(transformers, name)):  # type: ignore[misc]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return NoVideoProcessor


class OnevisionProcessor:
    """transformers' `LlavaOnevisionProcessor` for text and images, with kiln's video preparation beside it."""

    processor_class = "LlavaOnevisionProcessor"
    processor_keys = PROCESSOR_KEYS

    def __init__(self, tokenizer: Any, image_processor: Any, settings: Mapping[str, Any], video: Mapping[str, Any]):
        self.settings = {k: v for k, v in settings.items() if k in self.processor_keys}
        self.video = dict(video)
        self.inner = without_video_processor(self.processor_class)(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **self.settings
        )
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token, self.video_token = str(self.inner.image_token), str(self.inner.video_token)
        self.num_frames = int(self.video.get("num_frames") or DEFAULT_NUM_FRAMES)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Any:
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        settings = json.loads((path / PROCESSOR_CONFIG).read_text()) if (path / PROCESSOR_CONFIG).is_file() else {}
        video = json.loads((path / VIDEO_CONFIG).read_text()) if (path / VIDEO_CONFIG).is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(tokenizer, AutoImageProcessor.from_pretrained(path, local_files_only=True), settings, video)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / PROCESSOR_CONFIG).write_text(json.dumps(self.settings, indent=2))
        (path / VIDEO_CONFIG).write_text(json.dumps(self.video, indent=2))

    def video_pixels(self, frames: list[Any]) -> torch.Tensor:
        """[frames, 3, H, W]: each frame resized to the video size, scaled and normalized."""
        from PIL import Image

        size = self.video.get("size") or {"height": 384, "width": 384}
        mean = torch.tensor(self.video.get("image_mean") or CLIP_MEAN)[:, None, None]
        std = torch.tensor(self.video.get("image_std") or CLIP_STD)[:, None, None]
        scale = float(self.video.get("rescale_factor") or 1 / 255)
        target = (int(size["width"]), int(size["height"]))
        arrays = [np.asarray(f.resize(target, Image.Resampling.BICUBIC), dtype=np.float32) for f in frames]
        return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * scale - mean) / std

    def __call__(
        self,
        text: str | list[str],
        images: list[Any] | None = None,
        return_tensors: str = "pt",
        videos: list[Any] | None = None,  # kiln.runtime.video.VideoClip: .frames
    ) -> dict[str, torch.Tensor]:
        """The processor's steps: images through the image processor, each image and video token expanded by the
        processor's own `replace_image_token` / `replace_video_token`, then the tokenizer."""
        texts = [text] if isinstance(text, str) else list(text)
        media: dict[str, dict[str, Any]] = {self.image_token: {}, self.video_token: {}}
        if images:
            media[self.image_token] = dict(self.image_processor(images, return_tensors="pt"))
        if videos:
            pixels = [self.video_pixels(list(clip.frames)) for clip in videos]
            if len({p.shape for p in pixels}) > 1:
                raise RequestError("the videos of one prompt must have the same number of frames")
            media[self.video_token] = {"pixel_values_videos": torch.stack(pixels)}
        replace = {self.image_token: self.inner.replace_image_token, self.video_token: self.inner.replace_video_token}
        given = {self.image_token: len(images or []), self.video_token: len(videos or [])}
        pattern = "(" + re.escape(self.image_token) + "|" + re.escape(self.video_token) + ")"
        expanded = []
        for t in texts:
            pieces, used = re.split(pattern, t), dict.fromkeys(given, 0)
            for k in range(1, len(pieces), 2):
                token = pieces[k]
                if used[token] >= given[token]:
                    raise RequestError(f"the prompt has more {token} tokens than it was given items for them")
                pieces[k] = replace[token](media[token], used[token])
                used[token] += 1
            expanded.append("".join(pieces))
        tokens = self.tokenizer(expanded, return_tensors=return_tensors)
        out = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        return {**out, **media[self.image_token], **media[self.video_token]}


class LlavaOnevision(ProcessorVideos, LlavaNext):
    architecture = "LlavaOnevisionForConditionalGeneration"
    notes = "LLaVA-NeXT's any-resolution images (anyres_max downscaling) and videos (pooled frames + a newline)"

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def tokens_per_image(self, config: Any) -> int:
        """Feature rows of one patch or frame (SigLIP has no CLS row to drop)."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        has_cls = "clip" in str(config.vision_config.model_type)
        return side * side + (1 if has_cls and config.vision_feature_select_strategy != "default" else 0)

    def default_max_multimodal_len(self, config: Any, max_batch_size: int) -> int:
        """The larger of one image of the largest grid and one video of the default frame count, per request."""
        video = max_batch_size * DEFAULT_NUM_FRAMES * self.tokens_per_image(config)
        return max(super().default_max_multimodal_len(config, max_batch_size), video)

    def runtime_config(self, config: Any) -> dict[str, Any]:
        return {
            **super().runtime_config(config),
            "vision_aspect_ratio": str(config.vision_aspect_ratio),
            "video_token_id": int(config.video_token_id),
        }

    # ---- run --------------------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        return OnevisionProcessor.from_pretrained(path)

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        per_item = features_per_item(program, items, limit)
        owner: Any = SimpleNamespace(
            config=SimpleNamespace(
                image_grid_pinpoints=config["image_grid_pinpoints"],
                vision_config=SimpleNamespace(image_size=config["image_size"], patch_size=config["patch_size"]),
            )
        )
        newline = state["image_newline"]
        out: list[torch.Tensor] = []
        for item, feats in zip(items, per_item):
            if "video_frames" in item.tensors:
                pooled = LlavaOnevisionModel.apply_pooling(owner, feats)
                out.append(torch.cat([pooled.reshape(-1, pooled.shape[-1]), newline[None].to(pooled)]))
                continue
            packed, _ = LlavaOnevisionModel.pack_image_features(
                owner,
                [feats],
                item.tensors["image_sizes"][None],
                image_newline=newline,
                vision_aspect_ratio=config["vision_aspect_ratio"],
            )
            out.append(packed[0])
        return out
