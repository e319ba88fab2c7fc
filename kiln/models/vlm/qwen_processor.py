"""Qwen2.5-VL's processor without torchvision: what `Qwen2_5_VLProcessor` returns for text, images and videos.

The checkpoint's `Qwen2_5_VLProcessor` also builds a video processor, which needs torchvision, so kiln
loads the tokenizer and the image processor, prepares videos with `qwen_video` and expands
`<|image_pad|>` / `<|video_pad|>` itself (one feature row per merged 2x2 patch block), as that processor does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kiln.errors import RequestError
from kiln.models.vlm.qwen_video import QwenVideoConfig, video_patches

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class QwenVLImageProcessor:
    """Tokenizer + image processor with the output of `Qwen2_5_VLProcessor` for text, images and videos; the
    videos' frames go through kiln's fallback for the video processor (`qwen_video`), which needs no torchvision."""

    def __init__(self, tokenizer: Any, image_processor: Any, video: QwenVideoConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video = video or QwenVideoConfig()
        self.image_token = str(getattr(tokenizer, "image_token", None) or IMAGE_TOKEN)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))
        self.video_token = str(getattr(tokenizer, "video_token", None) or VIDEO_TOKEN)
        self.video_token_id = int(tokenizer.convert_tokens_to_ids(self.video_token))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "QwenVLImageProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        images = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(tokenizer, images, QwenVideoConfig.from_files(Path(path), images))

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        self.video.save(Path(path))

    def __call__(
        self,
        text: str | list[str],
        images: list[Any] | None = None,
        return_tensors: str = "pt",
        videos: list[Any] | None = None,  # kiln.runtime.video.VideoClip: .frames, .sampled_fps
    ) -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, torch.Tensor] = {}
        merge = int(self.image_processor.merge_size) ** 2
        counts: dict[str, Iterator[int]] = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = pixels["pixel_values"]
            out["image_grid_thw"] = pixels["image_grid_thw"]
            counts[self.image_token] = iter([int(g.prod()) // merge for g in out["image_grid_thw"]])
        if videos:
            patches = [video_patches(list(clip.frames), self.video) for clip in videos]
            out["pixel_values_videos"] = torch.cat([p for p, _ in patches])
            out["video_grid_thw"] = torch.tensor([g for _, g in patches])
            out["second_per_grid_ts"] = torch.tensor([self.video.temporal_patch_size / c.sampled_fps for c in videos])
            counts[self.video_token] = iter([int(g.prod()) // merge for g in out["video_grid_thw"]])
        if counts:
            texts = [self._expand(t, counts) for t in texts]
        tokens = self.tokenizer(texts, return_tensors=return_tensors)
        out = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], **out}
        ids = out["input_ids"]
        out["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        return out

    @staticmethod
    def _expand(text: str, counts: dict[str, Iterator[int]]) -> str:
        """Each image or video token repeated to its item's feature count, in prompt order."""
        pattern = "(" + "|".join(re.escape(t) for t in counts) + ")"
        pieces = re.split(pattern, text)
        for k in range(1, len(pieces), 2):
            n = next(counts[pieces[k]], None)
            if n is None:
                raise RequestError(f"the prompt has more {pieces[k]} tokens than it was given items for them")
            pieces[k] = pieces[k] * n
        return "".join(pieces)
