"""Load an encoder-decoder checkpoint (offline, safetensors only) with its family."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import UnsupportedModelError
from kiln.models.encdec import FAMILIES, EncoderDecoderFamily
from kiln.models.loader import LoadedCheckpoint, _offline, check_checkpoint_dir, load_config
from kiln.models.quantized_formats import check_files
from kiln.models.registry import recipe_for


def load_encoder_decoder(
    path: str | Path, dtype: torch.dtype, device: torch.device
) -> tuple[LoadedCheckpoint, EncoderDecoderFamily]:
    """The model (transformers' own class, eager attention: kiln's modules call its layers' weights
    directly), config, tokenizer, generation config, and the family that wraps it."""
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    _offline()
    path = Path(path)
    check_files(path)
    check_checkpoint_dir(path)
    config = load_config(path)
    recipe = recipe_for(getattr(config, "architectures", None))
    family = FAMILIES[recipe.architecture]
    if getattr(config, "quantization_config", None) is not None:
        raise UnsupportedModelError(f"{recipe.architecture}: kiln builds encoder-decoder checkpoints unquantized only")
    model_class = getattr(transformers, recipe.architecture)
    try:
        model = model_class.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=True, local_files_only=True, attn_implementation="eager"
        )
    except (KeyError, ValueError, TypeError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"transformers could not load {recipe.architecture} from {path}: {exc}") from exc
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        generation_config = None
    return LoadedCheckpoint(model, config, tokenizer, recipe, generation_config), family
