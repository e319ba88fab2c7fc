"""Tiny MP4 clips for the video tests (encoded with PyAV here), and the Qwen2.5-VL video settings they use."""

from __future__ import annotations

import numpy as np

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
# the checkpoint's video_preprocessor_config.json: frames of 56-112 pixels a side, 4 frames by default
VIDEO_CONFIG = {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, "num_frames": 4}


def tiny_video(seed: int, height: int = 56, width: int = 84, frames: int = 8) -> bytes:
    """Random frames at 4 fps: sampling 4 of 8 gives one second per temporal patch of 2 frames."""
    from kiln.runtime.video import encode_mp4

    rng = np.random.default_rng(seed)
    return encode_mp4([rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(frames)], fps=4)
