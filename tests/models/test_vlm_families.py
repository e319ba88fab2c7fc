"""Vision-language families: kiln's batched greedy output against transformers' generate.

Each family is tested over the configurations of `vlm_checkpoints.VLM_VARIANTS`. Each batch mixes
prompts with one image, with two images and without images. By default on CPU in
float32: tokens identical, logits within 1e-3. With KILN_TEST_DEVICE=cuda KILN_TEST_DTYPE=bfloat16
(the GPU machine): the text families' bar (`test_families.compare`): tokens identical except where
the two disagree at a near-tie of transformers' own logits. Images have different sizes and
aspect ratios.
"""

from __future__ import annotations

import pytest
import torch
from test_families import DEVICE, DTYPE
from vlm_checkpoints import VLM_FAMILIES, VLM_VARIANTS, make_vlm_checkpoint, random_image
from vlm_reference import check_outputs, load_vlm_reference, record_logits, vlm_greedy

from kiln import LLM, SamplingParams, build

NEW_TOKENS = 8
LIMITS = dict(max_batch_size=4, max_input_len=200, max_seq_len=256, max_num_tokens=256)
ARCHITECTURE = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "blip2": "Blip2ForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "fuyu": "FuyuForCausalLM",
    "kosmos2": "Kosmos2ForConditionalGeneration",
}
IMAGE_TOKEN = {
    "llava": "<image>",
    "llava_next": "<image>",
    "blip2": "",
    "gemma3": "<start_of_image>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "fuyu": "",
    "kosmos2": "",
}


# Kosmos-2's grounding markup: special tokens of its processor that pass through as text.
GROUNDED = "<grounding> The<phrase> kiln</phrase><object><patch_index_0044><patch_index_0863></object>"
SWEEP = [(family, variant) for family in VLM_FAMILIES for variant in VLM_VARIANTS[family]]
SIZES = ((56, 56), (112, 112), (56, 112), (100, 60), (30, 64))  # (height, width): square, tall, wide, small


@pytest.fixture(scope="module")
def vlm_checkpoints(tmp_path_factory):
    made = {}

    def get(family, variant="base"):
        if (family, variant) not in made:
            directory = tmp_path_factory.mktemp(f"vlm-{family}-{variant}")
            made[family, variant] = make_vlm_checkpoint(family, directory, variant=variant)
        return made[family, variant]

    return get


def batch_for(family: str) -> list:
    tok = IMAGE_TOKEN[family]
    a, b = random_image(0, 40, 60), random_image(1, 64, 30)
    if not tok:  # the processor prepends the image tokens: one image per prompt
        return [
            {"prompt": "The kiln", "images": [a]},
            "The kiln fires clay",
            {"prompt": "Paged attention stores", "images": [b]},
        ]
    batch = [
        {"prompt": f"{tok}\nThe kiln", "images": [a]},
        "The kiln fires clay",
        {"prompt": f"Paged {tok} attention {tok} stores", "images": [b, a]},
    ]
    if family == "qwen2_5_vl":  # native resolution: a larger image has several attention windows
        batch.append({"prompt": f"{tok}{tok} The", "images": [random_image(2, 112, 100), b]})
    return batch


def sweep_batch(family: str) -> list:
    """Images of every size in SIZES: one per prompt, two in one prompt, and a prompt without images."""
    tok = IMAGE_TOKEN[family]
    im = [random_image(10 + i, h, w) for i, (h, w) in enumerate(SIZES)]
    if not tok:
        text = GROUNDED if family == "kosmos2" else "The kiln"
        return [{"prompt": text, "images": [image]} for image in im[:4]] + ["The kiln fires clay", GROUNDED]
    return [
        {"prompt": f"{tok}\nThe kiln", "images": [im[0]]},
        {"prompt": f"Paged {tok} attention {tok} stores", "images": [im[1], im[4]]},
        {"prompt": f"The {tok} kiln fires", "images": [im[2]]},
        "The kiln fires clay",
        {"prompt": f"{tok} clay", "images": [im[3]]},
    ]


def check_against_transformers(llm: LLM, checkpoint, family: str, batch: list) -> list:
    seen = record_logits(llm)
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    model, processor = load_vlm_reference(checkpoint, ARCHITECTURE[family], getattr(torch, DTYPE), DEVICE)
    check_outputs(
        family, batch, outs, seen, lambda p: vlm_greedy(model, processor, p["prompt"], p.get("images", []), NEW_TOKENS)
    )
    return outs


@pytest.mark.parametrize(("family", "variant"), SWEEP, ids=[f"{f}-{v}" for f, v in SWEEP])
def test_vlm_greedy_matches_transformers(family, variant, vlm_checkpoints, tmp_path):
    # Every configuration of each family, images of several sizes and aspect ratios.
    checkpoint = vlm_checkpoints(family, variant)
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, device=DEVICE, dtype=DTYPE, **LIMITS)
    check_against_transformers(LLM(engine), checkpoint, family, sweep_batch(family))


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_5_vl", "fuyu"])
def test_chunked_prefill_splits_images(family, vlm_checkpoints, tmp_path):
    # 6 tokens a step: each image's feature tokens (16; Qwen2.5-VL 6 and 16; Fuyu 24 and 8, with a text newline
    # token after each row of patches) are spread over several steps.
    checkpoint = vlm_checkpoints(family)
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, **{**LIMITS, "max_num_tokens": 6})
    check_against_transformers(LLM(engine), checkpoint, family, batch_for(family))


def test_qwen2_5_vl_compiled_engine(vlm_checkpoints, tmp_path):
    # The vision tower compiled with Inductor (dynamic patch count) as well as the LLM program; a vision batch of
    # 16 feature rows (64 patches) makes the four prompts' images run in several vision-program calls.
    checkpoint = vlm_checkpoints("qwen2_5_vl")
    engine = build(checkpoint, tmp_path / "engine", progress=False, **{**LIMITS, "max_multimodal_len": 16})
    llm = LLM(engine)
    facts = llm.engine.manifest.multimodal
    assert facts.vision_compiled and facts.vision_batch_limit == 64 and facts.position_rows == 3
    pipeline = llm.engine.multimodal
    program, calls = pipeline.program, []
    pipeline.program = lambda *args: calls.append(args[0].shape[0]) or program(*args)  # merged tokens per call
    check_against_transformers(llm, checkpoint, "qwen2_5_vl", batch_for("qwen2_5_vl"))
    assert len(calls) >= 3 and max(calls) <= 16 and sum(calls) == 6 + 6 + 6 + 16 + 6


def test_qwen2_5_vl_prefix_cache_keys_images(vlm_checkpoints, tmp_path):
    # M-RoPE positions and image features both live in the cached blocks: a repeated prompt reuses them, the same
    # prompt with another image of the same size (same token ids) reuses only the blocks before the image.
    checkpoint = vlm_checkpoints("qwen2_5_vl")
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, tokens_per_block=4, **LIMITS)
    llm = LLM(engine)
    tok = IMAGE_TOKEN["qwen2_5_vl"]
    prompt = f"The kiln fires {tok} clay into stone"
    a, b = random_image(0, 40, 60), random_image(3, 40, 60)
    llm.generate([{"prompt": prompt, "images": [a]}], SamplingParams(max_tokens=2, temperature=0.0))
    outs = check_against_transformers(
        llm, checkpoint, "qwen2_5_vl", [{"prompt": prompt, "images": [a]}, {"prompt": prompt, "images": [b]}]
    )
    start = outs[0].prompt_token_ids.index(engine_image_token_id(llm))
    same, other = (o.metrics["num_cached_tokens"] for o in outs)
    assert same > start + 6 and other == start // 4 * 4


def engine_image_token_id(llm: LLM) -> int:
    return llm.engine.manifest.multimodal.image_token_id


@pytest.mark.parametrize("variant", list(VLM_VARIANTS["qwen2_5_vl"]))
def test_qwen2_5_vl_parts_match_transformers(variant, vlm_checkpoints):
    # The host-side pieces on their own: vision features (kiln's segment-masked vision module, eager) against
    # transformers' get_image_features, M-RoPE positions against its get_rope_index, for every image size.
    from kiln.models.vlm.qwen2_5_vl import Qwen2_5VLVision, group_by_merge_unit, rope_index, vision_inputs

    checkpoint = vlm_checkpoints("qwen2_5_vl", variant)
    model, processor = load_vlm_reference(checkpoint, ARCHITECTURE["qwen2_5_vl"])
    tok = IMAGE_TOKEN["qwen2_5_vl"]
    images = [random_image(10 + i, h, w) for i, (h, w) in enumerate(SIZES)]
    inputs = processor(text=[f"A {tok} b {tok}{tok} c {tok}{tok} d"], images=images, return_tensors="pt")
    grids = [[int(v) for v in g] for g in inputs["image_grid_thw"]]
    vc = model.config.vision_config
    merge, window = vc.spatial_merge_size, vc.window_size // vc.spatial_merge_size // vc.patch_size
    with torch.no_grad():
        ours = Qwen2_5VLVision(model.model.visual)(
            *group_by_merge_unit(merge**2, inputs["pixel_values"], *vision_inputs(grids, merge, window))
        )
        theirs = torch.cat(
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        )
    assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) < 1e-5
    ids = inputs["input_ids"][0].tolist()
    positions, delta = rope_index(ids, grids, model.config.image_token_id, merge)
    ref_positions, ref_delta = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    assert torch.equal(positions, ref_positions[:, 0]) and delta == int(ref_delta)
