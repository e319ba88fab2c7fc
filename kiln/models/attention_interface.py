"""kiln's attention backend for transformers' `AttentionInterface`.

transformers' attention modules compute q/k/v (projections, norms, rotary embeddings) in their
own code and hand them to a registered attention function together with the layer's scale,
sliding window and soft-cap. kiln registers one that records an `attention_site` op per layer,
so the unmodified model is captured with each layer's attention facts as graph constants. As the
name has no mask function registered, transformers builds no attention masks at all.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import kiln.kernels  # noqa: F401  (registers the ops)
from kiln.errors import UnsupportedModelError

ATTENTION_NAME = "kiln"


def kiln_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, Dv], None)."""
    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError(f"{type(module).__name__} uses attention sinks, which kiln does not support yet")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no layer_idx, so kiln cannot assign it a KV cache")
    if query.shape[0] != 1:
        raise RuntimeError(f"kiln captures packed tokens as one row; got a batch of {query.shape[0]}")
    head_dim = query.shape[-1]
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(head_dim)
    out = torch.ops.kiln.attention_site(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        int(layer),
        scale,
        int(sliding_window) if sliding_window else -1,
        float(softcap) if softcap else 0.0,
    )
    return out.unsqueeze(0), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kiln_attention)
