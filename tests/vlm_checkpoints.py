"""Tiny random-weight vision-language checkpoints (model + processor), saved with save_pretrained.

Each family keeps its real transformers config, model and processor classes; widths, depths and
image sizes are small so a build and a comparison with transformers take seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiny_checkpoints import make_tokenizer
from vlm_more_checkpoints import MORE_FAMILIES, MORE_VARIANTS

TEXT = dict(
    vocab_size=336,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


def tokenizer_with(*tokens: str) -> Any:
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tok


def _llava(v: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers import LlavaForConditionalGeneration as Model

    tok = tokenizer_with("<image>")
    strategy = v.get("vision_feature_select_strategy", "default")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP, image_size=56, patch_size=14),
        text_config=LlamaConfig(**{**TEXT, **v.get("text", {})}),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=v.get("vision_feature_layer", -2),
        vision_feature_select_strategy=strategy,
        projector_hidden_act=v.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=v.get("multimodal_projector_bias", True),
    )
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    return Model(config), processor


def _llava_next(v: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor
    from transformers import LlavaNextForConditionalGeneration as Model

    tok = tokenizer_with("<image>")
    pinpoints = v.get("image_grid_pinpoints", [[28, 56], [56, 28], [56, 56]])
    strategy = v.get("vision_feature_select_strategy", "default")
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**CLIP, image_size=28, patch_size=7),
        text_config=LlamaConfig(**{**TEXT, **v.get("text", {})}),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=v.get("vision_feature_layer", -1),
        vision_feature_select_strategy=strategy,
    )
    images = LlavaNextImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=7,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    return Model(config), processor


def _blip2(v: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import (
        Blip2Config,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )
    from transformers import Blip2ForConditionalGeneration as Model

    tok = tokenizer_with("<image>")
    text = OPTConfig(
        vocab_size=336,
        max_position_embeddings=512,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **v.get("text", {}),
    )
    queries = v.get("num_query_tokens", 4)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**{**CLIP, "image_size": 28, "patch_size": 14}),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32,
            num_hidden_layers=v.get("qformer_layers", 1),
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=32,
            cross_attention_frequency=v.get("cross_attention_frequency", 2),
        ),
        text_config=text,
        num_query_tokens=queries,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    images = BlipImageProcessor(size={"height": 28, "width": 28})
    return Model(config), Blip2Processor(image_processor=images, tokenizer=tok, num_query_tokens=queries)


def _gemma3(v: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers import Gemma3ForConditionalGeneration as Model

    tok = make_tokenizer()
    special = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok.add_special_tokens({"additional_special_tokens": list(special.values())})
    tok = type(tok)(tokenizer_object=tok.backend_tokenizer, extra_special_tokens=special, **tok.special_tokens_map)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in special.items()}
    text = Gemma3TextConfig(
        **{
            **TEXT,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            **v.get("text", {}),
        }
    )
    tokens = v.get("mm_tokens_per_image", 4)
    config = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**{**CLIP, "image_size": 28, "patch_size": 7}),
        mm_tokens_per_image=tokens,
        image_token_index=ids["image_token"],
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
    )
    images = Gemma3ImageProcessor(size={"height": 28, "width": 28})
    return Model(config), Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=tokens)


QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen2_5_vl(v: Mapping[str, Any]) -> tuple[Any, Any]:
    """By default windows of 2x2 merged tokens (window_size 56), layer 0 windowed and layer 1 full; images of
    16-64 patches. A variant sets rope_theta, mrope_section (head_dim = 2 x its sum), depth, fullatt_block_indexes
    and window_size.

    Saved as tokenizer + image processor: `Qwen2_5_VLProcessor` needs a video processor, which needs torchvision.
    """
    from transformers import Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as Model

    tok = tokenizer_with(*QWEN_VL_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}
    section = list(v.get("mrope_section", [2, 3, 3]))
    heads = TEXT["hidden_size"] // (2 * sum(section))  # transformers takes head_dim = hidden / heads
    rope = {"rope_type": "default", "rope_theta": v.get("rope_theta", 10000.0), "mrope_section": section}
    text = {**TEXT, "num_attention_heads": heads, "num_key_value_heads": min(heads, 2), "rope_parameters": rope}
    vision = dict(
        depth=v.get("depth", 2),
        hidden_size=32,
        intermediate_size=64,
        num_heads=v.get("vision_heads", 4),
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=v.get("window_size", 56),
        fullatt_block_indexes=list(v.get("fullatt_block_indexes", [1])),
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    try:  # the PIL image processor (transformers >= 5.2x names it ...Pil; before, it was the plain class)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Images
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Images

    images = Images(min_pixels=56 * 56, max_pixels=112 * 112)
    return Model(config), _SavedTogether(tok, images)


class _SavedTogether:
    """Saves a tokenizer and an image processor into one directory (a checkpoint's processor files)."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def save_pretrained(self, directory: Path) -> None:
        for part in self.parts:
            part.save_pretrained(directory)


def qwen_vl_reference_processor(checkpoint: Path) -> Any:
    """transformers' own `Qwen2_5_VLProcessor` from the checkpoint's files, without the video processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    class NoVideo(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return NoVideo(
        image_processor=AutoImageProcessor.from_pretrained(checkpoint),
        tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        video_processor=None,
    )


VLM_FAMILIES: dict[str, Callable[[Mapping[str, Any]], tuple[Any, Any]]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "blip2": _blip2,
    "gemma3": _gemma3,
    "qwen2_5_vl": _qwen2_5_vl,
    **MORE_FAMILIES,
}


# Configurations each family is tested over (the first is the family's base, used by the other VLM tests):
# what the family's config varies, each option given against the base.
VLM_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "llava": {
        "base": {},
        "full-last-silu": {
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "projector_hidden_act": "silu",
            "multimodal_projector_bias": False,
        },
        "two-layers": {"vision_feature_layer": [-3, -1], "text": {"tie_word_embeddings": True}},
        # dynamic NTK in the language model: captured as the default rotary embedding (kiln.models.rope)
        "dynamic-rope": {"text": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}},
    },
    "llava_next": {
        "base": {},
        # (the "full" strategy is left out: transformers' own pack_image_features cannot shape its CLS row)
        "layer-2-wide-grids": {
            "vision_feature_layer": -2,
            "image_grid_pinpoints": [[28, 84], [84, 28], [56, 56], [28, 28]],
        },
    },
    "blip2": {
        "base": {},
        "8-queries-2-layers": {"num_query_tokens": 8, "qformer_layers": 2, "cross_attention_frequency": 1},
    },
    "gemma3": {
        "base": {},
        "16-tokens-window-4": {
            "mm_tokens_per_image": 16,
            "text": {"sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"]},
        },
        "1-token-all-sliding": {
            "mm_tokens_per_image": 1,
            "text": {"sliding_window": 6, "layer_types": ["sliding_attention", "sliding_attention"]},
        },
    },
    "qwen2_5_vl": {
        "base": {},
        "theta-1e6-depth-4": {
            "rope_theta": 1e6,
            "mrope_section": [4, 6, 6],
            "depth": 4,
            "fullatt_block_indexes": [1, 3],
            "window_size": 56,
        },
        # windows of 4x4 merged tokens: each test image (at most 112x112) is one window
        "window-112": {
            "rope_theta": 5e5,
            "mrope_section": [4, 2, 2],
            "depth": 3,
            "fullatt_block_indexes": [0],
            "window_size": 112,
        },
        "window-28": {
            "mrope_section": [2, 4, 2],
            "fullatt_block_indexes": [],
            "window_size": 28,
            "vision_heads": 2,
        },
    },
    **MORE_VARIANTS,
}


def make_vlm_checkpoint(family: str, directory: Path, seed: int = 0, variant: str = "base") -> Path:
    torch.manual_seed(seed)
    model, processor = VLM_FAMILIES[family](VLM_VARIANTS[family][variant])
    model.eval()
    # Random init leaves some weights at zero or one (norms, projections): give them noise too, so every
    # weight matters to the comparison.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def random_image(seed: int, height: int, width: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
