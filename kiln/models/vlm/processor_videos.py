"""The video half of the LLaVA families whose processor takes images and videos in one call
(LLaVA-OneVision, LLaVA-NeXT-Video): prompt token, frame sampling, the processor call, one item per
video, and the vision program's features split back per item."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kiln.models.vlm.base import ImageItem, VisionProgram, run_in_batches


class ProcessorVideos:
    """Mixed into a `VisionLanguageFamily` whose processor has `video_token` and `num_frames`."""

    def prompt_video_token(self, processor: Any) -> str | None:
        return str(processor.video_token)

    def video_sampling(self, processor: Any) -> tuple[int, int]:
        return processor.num_frames, 1

    def process_media(
        self,
        processor: Any,
        prompt: str | list[int],
        images: list[Any],
        videos: list[Any],
        config: Mapping[str, Any],
    ) -> Mapping[str, torch.Tensor]:
        return processor(text=[prompt], images=images or None, videos=videos or None, return_tensors="pt")

    def split_videos(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        if "pixel_values_videos" not in processed:
            return []
        return [ImageItem({"video_frames": frames}) for frames in processed["pixel_values_videos"]]


def features_per_item(program: VisionProgram, items: list[ImageItem], limit: int) -> tuple[torch.Tensor, ...]:
    """The vision program over every item's frames or image patches in one batch, split back per item."""
    inputs = [item.tensors["video_frames" if "video_frames" in item.tensors else "pixel_values"] for item in items]
    features = run_in_batches(program, torch.cat(inputs), limit)
    return torch.split(features, [x.shape[0] for x in inputs])


__all__ = ["ProcessorVideos", "features_per_item"]
