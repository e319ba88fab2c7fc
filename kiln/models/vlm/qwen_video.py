"""Qwen2.5-VL's video input without torchvision: the frame-sampling fallback for `Qwen2VLVideoProcessor`.

transformers' video processor for Qwen2-VL / Qwen2.5-VL imports torchvision, which kiln does not
need, so kiln reproduces its steps on the sampled frames (`kiln.runtime.video`):
resize every frame to `smart_resize` of the first frame's size (multiples of patch x merge, between
the video `min_pixels` and `max_pixels`), scale to [0, 1], normalize with the mean and std,
repeat the last frame up to a multiple of `temporal_patch_size`, and flatten into patches
`[grid_t * grid_h * grid_w, C * temporal * patch * patch]` in the processor's order. The one
difference: frames are resized with PIL's bicubic filter (as the image processor does), where the
video processor uses torchvision's, so pixels can differ by rounding.
`second_per_grid_ts` is `temporal_patch_size / sampled fps`, as `Qwen2_5_VLProcessor` computes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import KilnError

VIDEO_CONFIG = "video_preprocessor_config.json"
# Qwen2VLVideoProcessor's class defaults, used where the checkpoint has no video config
DEFAULT_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_PIXELS = 768 * 28 * 28
DEFAULT_NUM_FRAMES = 8  # kiln's default when neither the request nor the video config names a count


@dataclass(frozen=True)
class QwenVideoConfig:
    """The video processor's settings kiln reads (from video_preprocessor_config.json, else the defaults)."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    num_frames: int = DEFAULT_NUM_FRAMES

    @classmethod
    def from_files(cls, directory: Path, image_processor: Any) -> "QwenVideoConfig":
        """The checkpoint's video config; missing values come from its image processor, then the defaults."""
        values: dict[str, Any] = {}
        for name in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            if getattr(image_processor, name, None) is not None:
                values[name] = getattr(image_processor, name)
        path = Path(directory) / VIDEO_CONFIG
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise KilnError(f"{path} is not valid JSON: {exc}") from exc
            size = raw.get("size") or {}
            raw.setdefault("min_pixels", size.get("shortest_edge"))
            raw.setdefault("max_pixels", size.get("longest_edge"))
            known = {f.name for f in fields(cls)}
            values.update({k: v for k, v in raw.items() if k in known and v is not None})
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """What `save` writes: the video processor's own keys."""
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "num_frames": self.num_frames,
        }

    def save(self, directory: Path) -> None:
        (Path(directory) / VIDEO_CONFIG).write_text(json.dumps(self.to_json(), indent=2))


def video_patches(frames: list[Any], cfg: QwenVideoConfig) -> tuple[torch.Tensor, list[int]]:
    """Patches [grid_t * grid_h * grid_w, C * T * ps * ps] and the grid (t, h, w) of one video's RGB frames."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    width, height = frames[0].size
    factor = cfg.patch_size * cfg.merge_size
    new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    resized = [np.asarray(f.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.float32) for f in frames]
    video = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2) * cfg.rescale_factor  # [F, C, H, W]
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None]
    video = (video - mean) / std
    tps, ps, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -video.shape[0] % tps:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    channels = video.shape[1]
    gt, gh, gw = video.shape[0] // tps, new_h // ps, new_w // ps
    patches = video.reshape(gt, tps, channels, gh // m, m, ps, gw // m, m, ps)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # time, block row, block col, in-block row/col, C, T, ps, ps
    return patches.reshape(gt * gh * gw, channels * tps * ps * ps).contiguous(), [gt, gh, gw]
