"""Load a Hugging Face checkpoint directory with transformers, safely and offline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError, UnsupportedModelError
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats import CheckpointQuantization, check_files, from_pretrained_dense
from kiln.models.registry import ModelRecipe, recipe_for
from kiln.models.rope import freeze_dynamic_rope

ATTENTION_NAME = "kiln"


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    config: Any
    tokenizer: Any
    recipe: ModelRecipe
    generation_config: Any | None
    quantized: QuantizedLinears | None = None  # a pre-quantized checkpoint's linears (the model holds them dense)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def check_checkpoint_dir(path: Path) -> None:
    if not path.is_dir():
        raise KilnError(f"checkpoint directory {path} does not exist (kiln loads local checkpoints only, no downloads)")
    if not (path / "config.json").is_file():
        raise KilnError(f"{path} has no config.json: it is not a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled}: pickled weights are not loaded, for safety)" if pickled else ""
        raise KilnError(
            f"{path} has no *.safetensors weights{hint}. kiln loads weights only from safetensors; "
            "convert with `model.save_pretrained(dir, safe_serialization=True)`."
        )


def checkpoint_has_code(path: Path) -> bool:
    """Whether the checkpoint ships modelling code of its own (an `auto_map` in config.json, or *.py files)."""
    if any(path.glob("*.py")):
        return True
    try:
        return "auto_map" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_config(path: Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    _offline()
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UnsupportedModelError(
                f"{path} needs its own modelling code; kiln runs checkpoint code only with --trust-remote-code"
            ) from exc
        raise UnsupportedModelError(f"transformers cannot read {path}/config.json: {exc}") from exc


_ATTENTION_FIELDS = ("num_hidden_layers", "num_attention_heads")


def require_attention(config: Any, architecture: str) -> None:
    """Refuse a model whose (text) config does not describe attention layers: kiln's engines keep a KV cache."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    missing = [name for name in _ATTENTION_FIELDS if not isinstance(getattr(text, name, None), int)]
    if not missing and not isinstance(getattr(text, "head_dim", None) or getattr(text, "hidden_size", None), int):
        missing = ["head_dim or hidden_size"]
    if missing:
        raise UnsupportedModelError(
            f"{architecture} has no attention layers that kiln can cache (its config has no {', '.join(missing)}): "
            "kiln builds transformer models whose layers use attention with a KV cache; state-space and other "
            "attention-free models (Mamba, RWKV) are not supported"
        )


def load_checkpoint(
    path: str | Path, dtype: torch.dtype, device: torch.device, *, trust_remote_code: bool = False
) -> LoadedCheckpoint:
    """Load model (weights streamed from safetensors), tokenizer and generation config.

    A pre-quantized checkpoint (AWQ, GPTQ, compressed-tensors) is read and checked before anything is
    built, then loaded dense with the weights its quantized linears stand for (`quantized` keeps them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from kiln.models.attention_interface import register_attention

    path = Path(path)
    check_files(path)
    check_checkpoint_dir(path)
    quantization = CheckpointQuantization.of(path)
    config = load_config(path, trust_remote_code=trust_remote_code)
    recipe = recipe_for(
        getattr(config, "architectures", None), trust_remote_code=trust_remote_code, has_code=checkpoint_has_code(path)
    )
    require_attention(config, recipe.architecture)
    quantized = quantization.read(dtype)
    register_attention()
    try:
        model, quantized = from_pretrained_dense(
            AutoModelForCausalLM.from_pretrained,
            path,
            config,
            quantized,
            dtype=dtype,
            attn_implementation=ATTENTION_NAME,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            device_map=str(device) if device.type != "cpu" else None,
        )
    except KeyError as exc:
        if exc.args == (ATTENTION_NAME,):
            raise UnsupportedModelError(
                f"{recipe.architecture}: transformers' implementation of this architecture does not take a pluggable "
                "attention function (AttentionInterface), so kiln cannot give it a paged KV cache"
            ) from exc
        raise UnsupportedModelError(f"transformers could not load {recipe.architecture} from {path}: {exc!r}") from exc
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise UnsupportedModelError(
            f"transformers could not load {recipe.architecture} from {path} with kiln's attention: {exc}"
        ) from exc
    model.eval()
    freeze_dynamic_rope(model)
    if device.type == "cpu":
        model.to(device)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    try:
        generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        generation_config = None
    return LoadedCheckpoint(model, config, tokenizer, recipe, generation_config, quantized)
