"""Phi-4-multimodal's vision path: kiln's batched greedy output against transformers'
`Phi4MultimodalForCausalLM.generate` fed the same processor outputs (kiln's processor here: transformers'
needs torchvision; tests/unit/test_phi4mm_images.py compares the two where it is installed).

Two configurations (`phi4mm_checkpoints.VARIANTS`): the base one carries a vision LoRA adapter (vision-lora/,
merged at build; the reference merges it as PEFT does), the other caps images at 2 crops, so the wide image's
1x3 grid becomes 2x1 through the aspect-ratio search. Each batch mixes a one-crop image, a tall 2x1 grid, a wide
grid with padding trimmed, two images in one prompt and a text-only prompt. float32 on CPU: tokens identical,
logits within 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from phi4mm_checkpoints import IMAGE_TOKEN, VARIANTS, make_phi4mm_checkpoint, merge_lora_reference
from test_families import DEVICE, DTYPE
from vlm_checkpoints import random_image
from vlm_reference import check_outputs, greedy_generate, record_logits

from kiln import LLM, SamplingParams, build
from kiln.models.vlm.phi4mm_processor import load_phi4mm_processor

NEW_TOKENS = 6
LIMITS = dict(max_batch_size=4, max_input_len=1400, max_seq_len=1440, max_num_tokens=1536, max_multimodal_len=3072)


def batch() -> list:
    small, tall, wide = random_image(0, 40, 60), random_image(1, 500, 300), random_image(2, 30, 1000)
    return [
        {"prompt": f"{IMAGE_TOKEN}\nThe kiln", "images": [small]},
        "The kiln fires clay",
        {"prompt": f"Paged {IMAGE_TOKEN} attention {IMAGE_TOKEN} stores", "images": [tall, small]},
        {"prompt": f"The {IMAGE_TOKEN} kiln", "images": [wide]},
    ]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    return request.param, make_phi4mm_checkpoint(tmp_path_factory.mktemp(f"phi4mm-{request.param}"), request.param)


def reference(checkpoint):
    from transformers import Phi4MultimodalForCausalLM

    dtype = getattr(torch, DTYPE)
    model = Phi4MultimodalForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=dtype)
    if (checkpoint / "vision-lora").is_dir():  # the model card's vision adapter, merged as PEFT merges it
        merge_lora_reference(model, checkpoint / "vision-lora")
    model = model.to(DEVICE).eval()
    processor = load_phi4mm_processor(checkpoint)

    def run(prompt: dict) -> tuple[list[int], list[torch.Tensor]]:
        inputs = dict(processor(text=[prompt["prompt"]], images=prompt.get("images") or None, return_tensors="pt"))
        inputs.pop("num_img_tokens", None)
        return greedy_generate(model, inputs, NEW_TOKENS)

    return run


def test_phi4mm_greedy_matches_transformers(variant, tmp_path):
    name, checkpoint = variant
    # base: one vision call for the batch's 11 crops; the other (10 crops): 6 a call, splitting an image's crops
    limits = {**LIMITS, "max_multimodal_len": 3072 if name == "base" else 1536}
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, device=DEVICE, dtype=DTYPE, **limits)
    llm = LLM(engine)
    seen = record_logits(llm)
    pipeline = llm.engine.multimodal
    program, calls = pipeline.program, []
    pipeline.program = lambda *args: calls.append(args[0].shape[0]) or program(*args)  # crops per call
    prompts = batch()
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    check_outputs("phi4_multimodal", prompts, outs, seen, reference(checkpoint))
    assert calls == ([11] if name == "base" else [6, 4])
    # the image tokens: 1 + 2 + 1 images' rows, as many as the processor wrote
    image_id = llm.engine.manifest.multimodal.image_token_id
    assert [o.prompt_token_ids.count(image_id) > 0 for o in outs] == [True, False, True, True]
