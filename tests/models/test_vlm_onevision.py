"""LLaVA-OneVision: images and videos, kiln's batched greedy output against transformers' generate.

A tiny random-weight checkpoint (SigLIP tower, Qwen2 language model) with its real config, model and
image processor classes; the video processor needs torchvision, so the reference model gets the
frames kiln prepares (`OnevisionProcessor`) and its own image processor's pixels.
"""

from __future__ import annotations

import pytest
import torch
from test_families import DEVICE, DTYPE
from video_clips import ONEVISION_VARIANTS, make_onevision_checkpoint, tiny_video
from vlm_checkpoints import random_image
from vlm_reference import check_outputs, clips_generate, record_logits

from kiln import LLM, SamplingParams, build
from kiln.models.vlm.llava_onevision import OnevisionProcessor

pytest.importorskip("av")

NEW_TOKENS = 6
LIMITS = dict(max_batch_size=4, max_input_len=200, max_seq_len=256, max_num_tokens=256)


@pytest.fixture(scope="module", params=list(ONEVISION_VARIANTS))
def onevision(request, tmp_path_factory):
    checkpoint = make_onevision_checkpoint(tmp_path_factory.mktemp("onevision-ckpt"), request.param)
    engine = build(
        checkpoint,
        tmp_path_factory.mktemp("onevision") / "engine",
        compile=False,
        progress=False,
        device=DEVICE,
        dtype=DTYPE,
        **LIMITS,
    )
    return checkpoint, engine


def test_onevision_images_and_videos_match_transformers(onevision):
    # One batch: a video (8 frames), an image of a 2x2 grid (downscaled by anyres_max_1), two images (base patches
    # only) around a 4-frame video, text alone.
    checkpoint, engine = onevision
    llm = LLM(engine)
    a, b = random_image(0, 40, 60), random_image(1, 64, 30)
    batch = [
        {"prompt": "<video> The kiln", "videos": [tiny_video(0)]},
        {"prompt": "<image> Describe", "images": [random_image(2, 56, 56)]},
        {"prompt": "A <image> then <video> and <image>", "images": [a, b], "videos": [tiny_video(1)], "num_frames": 4},
        "The kiln fires clay",
    ]
    seen = record_logits(llm)
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    from transformers import LlavaOnevisionForConditionalGeneration

    model = (
        LlavaOnevisionForConditionalGeneration.from_pretrained(
            checkpoint, attn_implementation="eager", dtype=getattr(torch, DTYPE)
        )
        .to(DEVICE)
        .eval()
    )
    processor = OnevisionProcessor.from_pretrained(checkpoint)
    video_id = processor.inner.video_token_id
    assert sum(t == video_id for t in outs[0].prompt_token_ids) == 8 * 2 * 2 + 1  # frames x pooled 2x2 + newline
    check_outputs(
        "llava_onevision",
        batch,
        outs,
        seen,
        lambda p: clips_generate(
            model, processor, p["prompt"], p.get("images", []), p.get("videos", []), p.get("num_frames"), NEW_TOKENS
        ),
    )
