"""What a build reads off a loaded model: the device to build on, its KV-cache layout, its manifest facts."""

from __future__ import annotations

from typing import Any

import torch

from kiln.compiler.program_spec import CacheShape
from kiln.engine.manifest import ModelFacts
from kiln.errors import KilnError
from kiln.models.loader import require_attention


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KilnError("--device cuda was asked for, but torch sees no CUDA GPU here")
    return torch.device(name)


def cache_shape(config: Any) -> CacheShape:
    require_attention(config, (getattr(config, "architectures", None) or [type(config).__name__])[0])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return CacheShape(num_layers=text.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def model_facts(loaded: Any, shape: CacheShape) -> ModelFacts:
    config = loaded.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    gen = loaded.generation_config
    eos = _ids(getattr(gen, "eos_token_id", None)) or _ids(getattr(text, "eos_token_id", None))
    eos = eos or _ids(loaded.tokenizer.eos_token_id)
    bos = getattr(text, "bos_token_id", None)
    pad = getattr(text, "pad_token_id", None)
    return ModelFacts(
        architecture=loaded.recipe.architecture,
        model_type=str(getattr(config, "model_type", "")),
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=int(text.vocab_size),
        max_position_embeddings=getattr(text, "max_position_embeddings", None),
        eos_token_ids=tuple(eos),
        bos_token_id=bos if isinstance(bos, int) else None,
        pad_token_id=pad if isinstance(pad, int) else None,
        has_chat_template=bool(getattr(loaded.tokenizer, "chat_template", None)),
    )
