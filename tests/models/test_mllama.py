"""Mllama (Llama 3.2 Vision): greedy tokens identical to transformers' `generate` on CPU in float32, in one batch
mixing image prompts (the image first or after text; one tile with a padding tile, or several), a prompt with
three images of other sizes (two adjacent, the first with a padding tile, then one more) and a text-only
prompt, over two configurations (cross-attention layers, tiles, KV heads; the second with chunked
prompts). On the GPU in bf16 (KILN_TEST_DEVICE=cuda KILN_TEST_DTYPE=bfloat16): the families' near-tie bar
(`greedy_compare`)."""

from __future__ import annotations

import pytest
import torch
from greedy_compare import DEVICE, DTYPE, LogitsSeen, check_against_generate
from mllama_checkpoints import make_mllama_checkpoint
from vlm_checkpoints import random_image

from kiln import LLM, SamplingParams, build

NEW_TOKENS = 8
REQUESTS = [  # (prompt, images as random_image's arguments)
    ("<|image|>Describe the kiln", [(0, 40, 20)]),
    ("just text, no image", []),
    ("The kiln <|image|> fires clay", [(1, 16, 16)]),
    ("Paged <|image|>", [(2, 20, 60)]),
    ("Two <|image|><|image|> then <|image|> last", [(3, 12, 12), (4, 18, 40), (5, 50, 20)]),
]


@pytest.mark.parametrize("variant", ["base", "first-layer"])
def test_mllama_matches_transformers(variant, tmp_path):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    checkpoint = make_mllama_checkpoint(tmp_path / "ckpt", variant)
    limits = dict(max_batch_size=5, max_input_len=80, max_seq_len=96, max_num_tokens=128)
    if variant == "first-layer":  # steps of 64 tokens: 60 image rows and a few tokens, the rest of a prompt later
        limits.update(max_num_tokens=64, max_encoder_input_len=60)
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, device=DEVICE, dtype=DTYPE, **limits)
    llm = LLM(engine)
    assert llm.engine.encoder_decoder is not None and llm.engine.encoder_decoder.decoder_prompt
    seen = LogitsSeen()
    llm.engine.logits_hook = seen
    images = {spec: random_image(*spec) for _, specs in REQUESTS for spec in specs}
    prompts = [{"prompt": text, "images": [images[s] for s in specs]} if specs else text for text, specs in REQUESTS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=getattr(torch, DTYPE)).to(DEVICE).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    for (text, specs), out in zip(REQUESTS, outs):
        inputs = processor(text=[text], images=[[images[s] for s in specs]] if specs else None, return_tensors="pt")
        inputs = {k: v.to(getattr(torch, DTYPE)) if v.is_floating_point() else v for k, v in inputs.items()}
        check_against_generate("mllama", model, inputs, inputs["input_ids"].shape[1], out, seen, NEW_TOKENS)
    assert len({tuple(o.token_ids) for o in outs}) == len(outs)
