"""Vision-language models on the encoder-decoder path, greedy tokens identical to transformers' `generate` on
CPU in float32: BLIP-2 with a Flan-T5 language model (image rows enter the T5 encoder program; a batch mixing
image and text-only prompts) and a Nougat/Donut-style `VisionEncoderDecoderModel` (Donut-Swin rows are the
encoder output of an mBART or BART decoder; images of several sizes), and Pix2Struct / Deplot (captioning, and VQA
with the prompt rendered as the image's header)."""

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


@pytest.mark.parametrize("vqa", [False, True], ids=["captioning", "vqa-header"])
def test_pix2struct_matches_transformers(vqa, tmp_path, monkeypatch):
    """Pix2Struct: images of several aspect ratios give different counts of real patches under one max_patches;
    a VQA (Deplot) checkpoint renders each prompt as the image's header. On the GPU in bf16 (KILN_TEST_DEVICE,
    KILN_TEST_DTYPE): the families' near-tie bar."""
    import huggingface_hub.constants
    from encdec_checkpoints import PIX2STRUCT_MAX_PATCHES, header_font_cache, make_pix2struct_checkpoint
    from greedy_compare import DEVICE, DTYPE, LogitsSeen, check_against_generate
    from transformers import Pix2StructForConditionalGeneration, Pix2StructProcessor

    if vqa:
        cache = header_font_cache(tmp_path / "hf-cache")
        if cache is None:
            pytest.skip("no TrueType font on this machine to render Deplot's header with")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    checkpoint = make_pix2struct_checkpoint(tmp_path / "ckpt", vqa=vqa)
    limits = dict(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=64)
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, device=DEVICE, dtype=DTYPE, **limits)
    llm = LLM(engine)
    seen = LogitsSeen()
    llm.engine.logits_hook = seen
    sizes = ((0, 40, 30), (1, 16, 64), (2, 32, 32))
    requests = [("what is it?" if vqa else "", random_image(seed, h, w)) for seed, h, w in sizes]
    outs = llm.generate(
        [{"prompt": text, "images": [im]} for text, im in requests],
        SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
    )
    dtype = getattr(torch, DTYPE)
    model = Pix2StructForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(DEVICE).eval()
    processor = Pix2StructProcessor.from_pretrained(checkpoint)
    counts = set()
    for (text, image), out in zip(requests, outs):
        inputs = processor(images=[image], text=text or None, max_patches=PIX2STRUCT_MAX_PATCHES, return_tensors="pt")
        counts.add(int(inputs["attention_mask"].sum()))
        inputs = {k: v.to(dtype) for k, v in inputs.items()}
        check_against_generate("pix2struct", model, inputs, 1, out, seen, NEW_TOKENS)
    assert len(counts) > 1 and len({tuple(o.token_ids) for o in outs}) > 1  # patch counts vary; the image matters
    wrong = "" if vqa else "a caption prompt"
    with pytest.raises(RequestError, match="text prompt"):
        llm.generate([{"prompt": wrong, "images": [requests[0][1]]}], SamplingParams(max_tokens=2))
