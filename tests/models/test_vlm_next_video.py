"""LLaVA-NeXT-Video: images and videos, kiln's batched greedy output against transformers' generate.

A tiny random-weight checkpoint (CLIP tower, Llama language model) with its real config, model and image
processor classes, over two configurations (average pooling; a learned conv pooling of an earlier layer).
The video processor needs torchvision, so the reference model gets the frames kiln prepares
(`NextVideoProcessor`) and its own image processor's pixels.
"""

from __future__ import annotations

import pytest
import torch
from test_families import DEVICE, DTYPE
from video_clips import NEXT_VIDEO_VARIANTS, make_next_video_checkpoint, tiny_video
from vlm_checkpoints import random_image
from vlm_reference import check_outputs, clips_generate, record_logits

from kiln import LLM, SamplingParams, build
from kiln.errors import RequestError
from kiln.models.vlm.llava_next_video import NextVideoProcessor
from kiln.runtime.video import load_video

pytest.importorskip("av")

NEW_TOKENS = 6
LIMITS = dict(max_batch_size=4, max_input_len=200, max_seq_len=256, max_num_tokens=256)


@pytest.fixture(scope="module", params=list(NEXT_VIDEO_VARIANTS))
def next_video(request, tmp_path_factory):
    checkpoint = make_next_video_checkpoint(tmp_path_factory.mktemp("next-video-ckpt"), request.param)
    engine = build(
        checkpoint,
        tmp_path_factory.mktemp("next-video") / "engine",
        compile=False,
        progress=False,
        device=DEVICE,
        dtype=DTYPE,
        **LIMITS,
    )
    return checkpoint, engine


def test_next_video_images_and_videos_match_transformers(next_video):
    # One batch: a video (4 frames by the video config), an image of a 2x2 grid, two images around a 6-frame video,
    # text alone.
    checkpoint, engine = next_video
    llm = LLM(engine)
    a, b = random_image(0, 40, 60), random_image(1, 64, 30)
    batch = [
        {"prompt": "<video> The kiln", "videos": [tiny_video(0)]},
        {"prompt": "<image> Describe", "images": [random_image(2, 56, 56)]},
        {"prompt": "A <image> then <video> and <image>", "images": [a, b], "videos": [tiny_video(1)], "num_frames": 6},
        "The kiln fires clay",
    ]
    seen = record_logits(llm)
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    from transformers import LlavaNextVideoForConditionalGeneration

    model = (
        LlavaNextVideoForConditionalGeneration.from_pretrained(
            checkpoint, attn_implementation="eager", dtype=getattr(torch, DTYPE)
        )
        .to(DEVICE)
        .eval()
    )
    processor = NextVideoProcessor.from_pretrained(checkpoint)
    video_id = processor.inner.video_token_id
    assert sum(t == video_id for t in outs[0].prompt_token_ids) == 4 * 2 * 2  # frames x pooled 2x2 rows
    assert sum(t == video_id for t in outs[2].prompt_token_ids) == 6 * 2 * 2
    check_outputs(
        "llava_next_video",
        batch,
        outs,
        seen,
        lambda p: clips_generate(
            model, processor, p["prompt"], p.get("images", []), p.get("videos", []), p.get("num_frames"), NEW_TOKENS
        ),
    )


def test_next_video_bad_videos_are_request_errors(next_video):
    _, engine = next_video
    llm = LLM(engine)
    good = tiny_video(3)
    cases = {
        "corrupt or unsupported video": {"prompt": "<video> x", "videos": [good[: len(good) // 4]]},
        "once where each video goes": {"prompt": "no token", "videos": [good]},
    }
    for message, prompt in cases.items():
        with pytest.raises(RequestError, match=message):
            llm.generate([prompt], SamplingParams(max_tokens=1))


def test_next_video_sizes_the_default_build():
    # Video NeVA's count: max_batch_size x frames x pooled rows per frame (8 frames x 12x12 rows at the 7B's 336
    # pixels / patch 14), or one image of the largest grid (2x2 + 1 patches of 576 rows) where that is more.
    from transformers import LlavaNextVideoConfig

    from kiln.models.vlm.llava_next_video import LlavaNextVideo

    family, config = LlavaNextVideo(), LlavaNextVideoConfig()
    assert family.frame_rows(config) == 144 and family.runtime_config(config)["frame_rows"] == 144
    assert family.default_max_multimodal_len(config, 2) == 2 * 5 * 576
    config.image_grid_pinpoints, config.spatial_pool_stride = [[336, 336]], 1  # no grid; frames unpooled
    assert family.default_max_multimodal_len(config, 2) == 2 * 8 * 576


def test_next_video_frames_without_a_video_config_follow_the_image_processor(tmp_path):
    # Older checkpoints have no video_preprocessor_config.json: frames take the image processor's size and crop.
    checkpoint = make_next_video_checkpoint(tmp_path / "ckpt")
    clip = load_video(tiny_video(0), 4)
    with_config = NextVideoProcessor.from_pretrained(checkpoint)(text=["<video> x"], videos=[clip])
    (checkpoint / "video_preprocessor_config.json").unlink()
    processor = NextVideoProcessor.from_pretrained(checkpoint)
    without = processor(text=["<video> x"], videos=[clip])
    assert processor.num_frames == 8  # kiln's default count
    assert torch.equal(with_config["pixel_values_videos"], without["pixel_values_videos"])
