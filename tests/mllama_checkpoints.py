"""A tiny random-weight Mllama (Llama 3.2 Vision) checkpoint with its processor, in two configurations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vlm_checkpoints import tokenizer_with
from vlm_more_checkpoints import CHAT_TEMPLATE

# variant -> (text config values, vision config values)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # cross-attention layers 1 and 3 of four; two tiles at most
    "base": (
        {"cross_attention_layers": [1, 3]},
        {"max_num_tiles": 2, "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
    ),
    # a cross-attention layer first, four tiles, grouped-query attention with one KV head
    "first-layer": (
        {"cross_attention_layers": [0, 2], "num_key_value_heads": 1},
        {
            "max_num_tiles": 4,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [2, 2], [1, 4], [4, 1]],
        },
    ),
}


def make_mllama_checkpoint(directory: Path, variant: str = "base") -> Path:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

    try:
        from transformers import MllamaImageProcessorPil as ImageProcessor  # type: ignore[attr-defined]
    except ImportError:
        from transformers import MllamaImageProcessor as ImageProcessor

    text_values, vision_values = VARIANTS[variant]
    tok = tokenizer_with("<|image|>", "<|python_tag|>")
    tok.chat_template = CHAT_TEMPLATE
    image_token = tok.convert_tokens_to_ids("<|image|>")
    text = {
        **dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        **text_values,
    }  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
        image_size=16, patch_size=8, vision_output_dim=64, intermediate_layers_indices=[0], **vision_values,
    )  # fmt: skip
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 or "gate" in name or "embedding" in name:
                param.normal_(0.0, 0.5 if "language_model" in name or "projector" in name else 0.2)
    model.save_pretrained(directory)
    images = ImageProcessor(size={"height": 16, "width": 16}, max_image_tiles=vision_values["max_num_tiles"])
    MllamaProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory
