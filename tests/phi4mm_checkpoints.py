"""A tiny random-weight Phi-4-multimodal checkpoint (`Phi4MultimodalForCausalLM`), vision path only.

The real config class at toy widths: the audio tower shrunk to one small block (kiln builds no audio
path), the SigLIP-style vision tower keeps its 448-pixel crops of 14-pixel patches (transformers'
processor counts image tokens for that size), at width 32 and 3 layers. The processor files are
written by hand: transformers' `Phi4MultimodalImageProcessor` needs torchvision, which the CPU test
machine lacks, so the test cannot instantiate it to save it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tiny_checkpoints import make_tokenizer

IMAGE_TOKEN, AUDIO_TOKEN = "<|image|>", "<|audio|>"
AUDIO = dict(
    hidden_size=16,
    intermediate_size=32,
    num_blocks=1,
    num_attention_heads=2,
    ext_pw_out_channel=16,
    depthwise_separable_out_channel=16,
    nemo_conv_channels=16,
    input_size=16,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(
    vocab_size=336,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
IMAGE_PROCESSOR = {
    "image_processor_type": "Phi4MultimodalImageProcessor",
    "size": {"height": 448, "width": 448},
    "patch_size": 14,
    "dynamic_hd": 36,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "resample": 3,
}
LORA_TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"vision_lora": {"r": 4, "lora_alpha": 8}},
    # the last vision layer's features, at most 2 crops (a 1x3 grid goes through the aspect-ratio search),
    # tied embeddings, a half-rotary head, no vision LoRA
    "last-layer-2-crops": {
        "feature_layer": -1,
        "dynamic_hd": 2,
        "text": {
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e4, "partial_rotary_factor": 0.5},
        },
    },
}


def phi4mm_tokenizer() -> Any:
    """kiln's tiny BPE tokenizer with the image and audio tokens named as Phi-4-multimodal's processor reads them."""
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
    )
    tok.chat_template = base.chat_template
    return tok


def make_phi4mm_checkpoint(directory: Path, variant: str = "base", seed: int = 0) -> Path:
    from transformers import Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

    v: Mapping[str, Any] = VARIANTS[variant]
    torch.manual_seed(seed)
    tok = phi4mm_tokenizer()
    image_id, audio_id = tok.convert_tokens_to_ids([IMAGE_TOKEN, AUDIO_TOKEN])
    config = Phi4MultimodalConfig(
        **{**TEXT, **v.get("text", {})},
        vision_config={**VISION, "image_token_id": image_id, "feature_layer": v.get("feature_layer", -2)},
        audio_config={**AUDIO, "audio_token_id": audio_id},
    )
    model = Phi4MultimodalForCausalLM(config).eval()
    with torch.no_grad():  # noise on every weight (norms, separators, zero-initialised parts) so each one matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    processor = {
        "processor_class": "Phi4MultimodalProcessor",
        "image_processor": {**IMAGE_PROCESSOR, "dynamic_hd": v.get("dynamic_hd", 36)},
        "audio_processor": Phi4MultimodalFeatureExtractor().to_dict(),
    }
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2))
    if "vision_lora" in v:
        write_vision_lora(model, directory / "vision-lora", **v["vision_lora"])
    return directory


def write_vision_lora(model: Any, folder: Path, r: int, lora_alpha: int) -> None:
    """A random LoRA adapter over the language model's linears, in PEFT's file layout (as the real checkpoint's)."""
    from safetensors.torch import save_file

    folder.mkdir()
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        for target in LORA_TARGETS:
            linear = layer.get_submodule(target)
            key = f"base_model.model.model.layers.{i}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, linear.in_features) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(linear.out_features, r) * 0.1
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": list(LORA_TARGETS)}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def merge_lora_reference(model: Any, folder: Path) -> None:
    """PEFT's merge, written out for the reference model: W += lora_alpha / r * B @ A for each adapted linear."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            model.get_submodule(name).weight += scale * (b @ tensors[key]).to(model.dtype)
