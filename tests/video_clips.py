"""Video test helpers: tiny MP4 clips (encoded with PyAV), Qwen2.5-VL video settings, LLaVA-OneVision checkpoints."""

from __future__ import annotations

import json

import numpy as np
import torch
from vlm_checkpoints import TEXT, tokenizer_with

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
# the checkpoint's video_preprocessor_config.json: frames of 56-112 pixels a side, 4 frames by default
VIDEO_CONFIG = {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, "num_frames": 4}


def tiny_video(seed: int, height: int = 56, width: int = 84, frames: int = 8) -> bytes:
    """Random frames at 4 fps: sampling 4 of 8 gives one second per temporal patch of 2 frames."""
    from kiln.runtime.video import encode_mp4

    rng = np.random.default_rng(seed)
    return encode_mp4([rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(frames)], fps=4)


PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
# base: SigLIP, every row kept, anyres_max_1 (a 2x2 grid is downscaled); clip: a CLIP tower whose CLS row is
# dropped ("default"), an earlier feature layer, anyres_max_9 (no downscaling)
ONEVISION_VARIANTS = {
    "base": {"tower": "siglip", "strategy": "full", "layer": -1, "aspect": "anyres_max_1"},
    "clip-default-layer-2": {"tower": "clip", "strategy": "default", "layer": -2, "aspect": "anyres_max_9"},
}


def make_onevision_checkpoint(directory, variant="base"):
    """Vision tower 28x28 / patch 7 (16 rows a patch), grids of at most 2x2 patches."""
    from transformers import (
        CLIPVisionConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil as Images,
    )

    torch.manual_seed(0)
    v = ONEVISION_VARIANTS[variant]
    tok = tokenizer_with("<image>", "<video>")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28)
    vision = (SiglipVisionConfig if v["tower"] == "siglip" else CLIPVisionConfig)(**tower, patch_size=7)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=v["layer"],
        vision_feature_select_strategy=v["strategy"],
        vision_aspect_ratio=v["aspect"],
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    Images(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS).save_pretrained(directory)
    # the processor counts a CLIP tower's CLS row in num_image_tokens (and drops it again for "default")
    rows = 16 + (v["tower"] == "clip")
    settings = {
        "num_image_tokens": rows,
        "vision_feature_select_strategy": v["strategy"],
        "vision_aspect_ratio": v["aspect"],
    }
    (directory / "processor_config.json").write_text(json.dumps(settings))
    (directory / "video_preprocessor_config.json").write_text(json.dumps({"size": {"height": 28, "width": 28}}))
    return directory


# base: 2x2 average pooling of the last layer's rows; conv-pool-layer-2: a learned 2x2 conv pooling an earlier layer,
# wider image grids
NEXT_VIDEO_VARIANTS = {
    "base": {"pool": "average", "layer": -1, "pinpoints": [[28, 56], [56, 28], [56, 56]]},
    "conv-pool-layer-2": {"pool": "conv", "layer": -2, "pinpoints": [[28, 84], [84, 28], [56, 56], [28, 28]]},
}


def make_next_video_checkpoint(directory, variant="base"):
    """LLaVA-NeXT-Video: CLIP tower 28x28 / patch 7 (16 rows a patch, 4 a pooled frame), a Llama language model."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    torch.manual_seed(0)
    v = NEXT_VIDEO_VARIANTS[variant]
    tok = tokenizer_with("<image>", "<video>")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28)
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**tower, patch_size=7),
        text_config=LlamaConfig(**TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=v["pinpoints"],
        vision_feature_layer=v["layer"],
        spatial_pool_mode=v["pool"],
    )
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    square = {"height": 28, "width": 28}
    images = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size=square, image_grid_pinpoints=v["pinpoints"])
    images.save_pretrained(directory)
    settings = {"patch_size": 7, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    (directory / "processor_config.json").write_text(json.dumps(settings))
    video = {"size": {"shortest_edge": 28}, "crop_size": square, "num_frames": 4}
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video))
    return directory
