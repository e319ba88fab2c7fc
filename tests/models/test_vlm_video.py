"""Video input (Qwen2.5-VL): kiln's batched greedy output against transformers' generate on the same frames.

The clips are tiny MP4s encoded here with PyAV (8 frames at 4 fps, 4 sampled: one second per temporal
patch, so transformers 5.17 and 5.25 place the temporal positions alike). transformers' video
processor needs torchvision, so the reference model gets the pixels of kiln's fallback
(`kiln.models.vlm.qwen_video`); its frame layout is checked against the processor's own patch order.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_families import DEVICE, DTYPE
from video_clips import VIDEO, VIDEO_CONFIG, tiny_video
from vlm_checkpoints import make_vlm_checkpoint, random_image
from vlm_reference import check_outputs, greedy_generate, load_vlm_reference, record_logits

from kiln import LLM, SamplingParams, build
from kiln.errors import RequestError
from kiln.models.vlm.qwen_processor import QwenVLImageProcessor
from kiln.runtime.video import load_video

pytest.importorskip("av")

NEW_TOKENS = 6
LIMITS = dict(max_batch_size=4, max_input_len=200, max_seq_len=256, max_num_tokens=256, max_multimodal_len=64)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def qwen_video_engine(tmp_path_factory):
    checkpoint = make_vlm_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("qwen-video-ckpt"))
    (checkpoint / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    engine = build(
        checkpoint,
        tmp_path_factory.mktemp("qwen-video") / "engine",
        compile=False,
        progress=False,
        device=DEVICE,
        dtype=DTYPE,
        **LIMITS,
    )
    return checkpoint, engine


@torch.no_grad()
def reference(model, processor, prompt: str, images: list, videos: list, num_frames: int | None):
    frames, multiple = num_frames or processor.video.num_frames, processor.video.temporal_patch_size
    clips = [load_video(v, frames, multiple) for v in videos]
    inputs = processor(text=[prompt], images=images or None, videos=clips or None)
    return greedy_generate(model, inputs, NEW_TOKENS)


def test_qwen2_5_vl_video_batch_matches_transformers(qwen_video_engine):
    # One batch: a video, a video between two images, text alone, an image alone, a wide video at 6 frames.
    checkpoint, engine = qwen_video_engine
    llm = LLM(engine)
    a, b = random_image(0, 40, 60), random_image(1, 64, 30)
    batch = [
        {"prompt": f"{VIDEO} The kiln", "videos": [tiny_video(0)]},
        {"prompt": f"A {IMAGE} then {VIDEO} and {IMAGE} clay", "images": [a, b], "videos": [tiny_video(1, 84, 56)]},
        "The kiln fires clay",
        {"prompt": f"{IMAGE} stores", "images": [b]},
        {"prompt": f"Two {VIDEO} frames", "videos": [tiny_video(2, 56, 112, frames=12)], "num_frames": 6},
    ]
    seen = record_logits(llm)
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    model, _ = load_vlm_reference(checkpoint, "Qwen2_5_VLForConditionalGeneration", getattr(torch, DTYPE), DEVICE)
    processor = QwenVLImageProcessor.from_pretrained(checkpoint)
    video_id = processor.video_token_id
    assert sum(t == video_id for t in outs[0].prompt_token_ids) == 2 * 2 * 3  # 2 temporal patches of 2x3 rows
    check_outputs(
        "qwen2_5_vl",
        batch,
        outs,
        seen,
        lambda p: reference(
            model, processor, p["prompt"], p.get("images", []), p.get("videos", []), p.get("num_frames")
        ),
    )


def test_video_patches_follow_the_processor_layout():
    # The fallback's patch order is the video processor's: a video of two identical frames gives the image
    # processor's patches of that frame (which repeats the frame over the temporal patch).
    from vlm_checkpoints import VLM_FAMILIES, VLM_VARIANTS

    from kiln.models.vlm.qwen_video import QwenVideoConfig, video_patches

    _, saved = VLM_FAMILIES["qwen2_5_vl"](VLM_VARIANTS["qwen2_5_vl"]["base"])
    images = saved.parts[1]
    frame = random_image(5, 56, 84)
    cfg = QwenVideoConfig(min_pixels=images.size["shortest_edge"], max_pixels=images.size["longest_edge"])
    patches, grid = video_patches([frame, frame], cfg)
    ref = images(images=[frame], return_tensors="pt")
    assert grid == [int(v) for v in ref["image_grid_thw"][0]]
    assert torch.allclose(patches, ref["pixel_values"], atol=1e-5)


def test_corrupt_and_misplaced_videos_are_request_errors(qwen_video_engine):
    _, engine = qwen_video_engine
    llm = LLM(engine)
    good = tiny_video(3)
    cases = {
        "corrupt or unsupported video": {"prompt": f"{VIDEO} x", "videos": [good[: len(good) // 4]]},
        "does not hold valid base64": {"prompt": f"{VIDEO} x", "videos": ["data:video/mp4;base64,@@@"]},
        "does not exist": {"prompt": f"{VIDEO} x", "videos": ["/no/such/clip.mp4"]},
        "once where each video goes": {"prompt": "no token", "videos": [good]},
        "num_frames must be a positive integer": {"prompt": f"{VIDEO} x", "videos": [good], "num_frames": 0},
    }
    for message, prompt in cases.items():
        with pytest.raises(RequestError, match=message):
            llm.generate([prompt], SamplingParams(max_tokens=1))


def test_qwen_video_sizes_the_default_build():
    # Video NeVA's count: max_batch_size x frames x rows per frame (8 frames = 4 temporal patches of 768 rows at the
    # video max_pixels); the vision batch stays at the image default's 10240 rows (x 4 patches a row).
    from transformers import Qwen2_5_VLConfig

    from kiln.models.vlm.qwen2_5_vl import Qwen2_5VL

    family, config = Qwen2_5VL(), Qwen2_5_VLConfig()
    assert family.tokens_per_video(config, 8) == 4 * 768 and family.tokens_per_video(config, 3) == 2 * 768
    assert family.default_max_multimodal_len(config, 8) == 8 * 3072
    assert family.vision_batch_limit(config, 8 * 3072) == 10240 * 4 and family.vision_batch_limit(config, 16) == 64
