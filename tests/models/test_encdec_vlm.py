"""Vision-language models on the encoder-decoder path, greedy tokens identical to transformers' `generate` on
CPU in float32: BLIP-2 with a Flan-T5 language model (image rows enter the T5 encoder program; a batch mixing
image and text-only prompts) and a Nougat/Donut-style `VisionEncoderDecoderModel` (Donut-Swin rows are the
encoder output of an mBART or BART decoder; images of several sizes)."""

from __future__ import annotations

import pytest
import torch
from encdec_checkpoints import make_blip2_t5_checkpoint, make_donut_checkpoint
from vlm_checkpoints import random_image

from kiln import LLM, RequestError, SamplingParams, build

NEW_TOKENS = 8
REQUESTS = [("Question: what is it?", 0, 28), ("Describe", 1, 40), ("just text, no image", None, 0)]


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_blip2_flan_t5_matches_transformers(feed_forward, tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    checkpoint = make_blip2_t5_checkpoint(tmp_path / "ckpt", feed_forward)
    limits = dict(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=64)
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, **limits)
    llm = LLM(engine)
    assert llm.engine.encoder_decoder is not None and llm.engine.manifest.multimodal is not None
    prompts = [
        {"prompt": text, "images": [random_image(seed, size, size)]} if seed is not None else text
        for text, seed, size in REQUESTS
    ]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = Blip2Processor.from_pretrained(checkpoint)
    with torch.no_grad():
        for (text, seed, size), out in zip(REQUESTS, outs):
            if seed is None:
                ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
                ref = model.language_model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            else:
                inputs = processor(images=[random_image(seed, size, size)], text=[text], return_tensors="pt")
                ref = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert out.token_ids == ref[0, 1:].tolist(), (feed_forward, text)


@pytest.mark.parametrize("decoder", ["mbart", "bart"])
def test_vision_encoder_decoder_matches_transformers(decoder, tmp_path):
    from transformers import AutoProcessor, VisionEncoderDecoderModel

    checkpoint = make_donut_checkpoint(tmp_path / "ckpt", pre_norm_decoder=decoder == "mbart")
    limits = dict(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=64)
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, **limits)
    llm = LLM(engine)
    images = [random_image(seed, h, w) for seed, h, w in ((0, 40, 30), (1, 64, 48), (2, 32, 24))]
    outs = llm.generate(
        [{"prompt": "", "images": [im]} for im in images], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    )
    model = VisionEncoderDecoderModel.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    with torch.no_grad():
        for image, out in zip(images, outs):
            pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
            ref = model.generate(pixels, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert out.token_ids == ref[0, 1:].tolist(), decoder
    assert len({tuple(o.token_ids) for o in outs}) > 1  # the image matters
    with pytest.raises(RequestError, match="no text prompt"):
        llm.generate([{"prompt": "a text", "images": [images[0]]}], SamplingParams(max_tokens=2))
