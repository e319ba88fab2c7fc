"""Load a vision-language checkpoint: kiln's attention for the language model, SDPA for the vision side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kiln.errors import UnsupportedModelError
from kiln.models.loader import (
    ATTENTION_NAME,
    LoadedCheckpoint,
    _offline,
    check_checkpoint_dir,
    checkpoint_has_code,
    load_config,
)
from kiln.models.quantized_formats import CheckpointQuantization, check_files, from_pretrained_dense
from kiln.models.registry import ModelRecipe, recipe_for
from kiln.models.rope import freeze_dynamic_rope
from kiln.models.vlm import VisionLanguageFamily, family_for
from kiln.models.vlm.refused import refuse_known

VISION_ATTENTION = "sdpa"


def attention_choice(config: Any, vision: str = VISION_ATTENTION) -> dict[str, str]:
    """kiln's attention for the top level and the text model; `vision` (SDPA) for every other sub-model
    (vision, Q-Former)."""
    choice = {"": ATTENTION_NAME}
    for name in getattr(config, "sub_configs", {}):
        choice[name] = ATTENTION_NAME if name == "text_config" else vision
    return choice


def declared_architectures(path: Path) -> list[str] | None:
    """config.json's `architectures`, read as plain JSON (None where it cannot be read)."""
    try:
        value = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def checkpoint_recipe(path: str | Path, *, trust_remote_code: bool = False) -> ModelRecipe:
    path = Path(path)
    check_files(path)  # a GGUF directory is named as such, not as one without config.json
    check_checkpoint_dir(path)
    refuse_known(declared_architectures(path))  # before transformers reads (or runs) anything of the checkpoint's
    config = load_config(path, trust_remote_code=trust_remote_code)
    return recipe_for(
        getattr(config, "architectures", None), trust_remote_code=trust_remote_code, has_code=checkpoint_has_code(path)
    )


def load_vision_language(
    path: str | Path, dtype: torch.dtype, device: torch.device
) -> tuple[LoadedCheckpoint, VisionLanguageFamily, Any]:
    """(model + config + tokenizer + recipe + generation config, the family, the checkpoint's processor).

    A pre-quantized checkpoint (its language model's linears in AWQ, GPTQ or compressed-tensors form) loads
    dense as in `load_checkpoint`; `quantized` keeps those linears under the model's parameter names."""
    import transformers
    from transformers import GenerationConfig

    from kiln.models.attention_interface import register_attention

    _offline()
    path = Path(path)
    check_files(path)
    check_checkpoint_dir(path)
    quantization = CheckpointQuantization.of(path)
    config = load_config(path)
    recipe = recipe_for(getattr(config, "architectures", None))
    family = family_for(recipe.architecture)
    quantized = quantization.read(dtype)
    register_attention()
    model_class = getattr(transformers, family.architecture)
    try:
        model, quantized = from_pretrained_dense(
            model_class.from_pretrained,
            path,
            config,
            quantized,
            dtype=dtype,
            attn_implementation=attention_choice(config, getattr(family, "vision_attention", VISION_ATTENTION)),
            use_safetensors=True,
            local_files_only=True,
            device_map=str(device) if device.type != "cpu" else None,
        )
    except (KeyError, ValueError, TypeError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"transformers could not load {recipe.architecture} from {path}: {exc}") from exc
    model.eval()
    family.prepare_model(model, path)
    freeze_dynamic_rope(model)  # as for text checkpoints (kiln.models.rope)
    if device.type == "cpu":
        model.to(device)
    try:
        processor = family.load_processor(path)
    except (OSError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(
            f"{path} has no usable processor for {recipe.architecture} ({type(exc).__name__}: {exc}); "
            "a vision-language checkpoint needs its processor files (preprocessor/processor config, tokenizer)"
        ) from exc
    try:
        generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        generation_config = None
    loaded = LoadedCheckpoint(model, config, processor.tokenizer, recipe, generation_config, quantized)
    return loaded, family, processor
