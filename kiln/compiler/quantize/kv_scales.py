"""Per-layer scales of a narrow (FP8 / int8) KV cache, from the keys and values of calibration text.

The model reads the calibration samples through a recording attention function that sees each
layer's keys and values as the cache would hold them (after the norms and the rotary embedding),
then hands them to kiln's own; scale = absmax / the dtype's largest value. FP8 without calibration
text uses scale 1.0 (E4M3 holds |x| up to 448); int8 cannot go without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.kernels.activation_quant import qmax
from kiln.kernels.kv_quant import KV_CACHE_DTYPES
from kiln.models.attention_interface import ATTENTION_NAME, kiln_attention

RECORDING = "kiln_kv_calibration"


@torch.no_grad()
def kv_absmax(model: torch.nn.Module, num_layers: int, samples: Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """max |key| and max |value| per layer over the calibration samples."""
    from transformers import AttentionInterface

    seen = [[0.0, 0.0] for _ in range(num_layers)]

    def record(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
               **kwargs: Any) -> Any:  # fmt: skip
        layer = int(getattr(module, "layer_idx", 0))
        seen[layer][0] = max(seen[layer][0], float(key.abs().amax()))
        seen[layer][1] = max(seen[layer][1], float(value.abs().amax()))
        return kiln_attention(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(RECORDING, record)
    device = next(model.parameters()).device
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise KilnError(f"{type(model).__name__} cannot switch its attention function: no KV cache calibration")
    setter(RECORDING)
    try:
        for ids in samples:
            model(input_ids=ids.to(device)[None])
    finally:
        setter(ATTENTION_NAME)
    return [(k, v) for k, v in seen]


def kv_scales(
    model: torch.nn.Module | None, num_layers: int, kv_cache_dtype: str, samples: Sequence[torch.Tensor] | None
) -> tuple[tuple[float, float], ...]:
    """(k, v) scales per layer for a cache of `kv_cache_dtype` ("fp8" / "int8"); the model is read only
    with calibration samples."""
    if samples is None:
        if kv_cache_dtype != "fp8":
            raise KilnError(f"an {kv_cache_dtype} KV cache needs per-layer scales: give --calib-data FILE")
        return tuple((1.0, 1.0) for _ in range(num_layers))
    if model is None:
        raise ValueError("calibrating a KV cache's scales needs the model")
    limit = qmax(KV_CACHE_DTYPES[kv_cache_dtype])
    return tuple((max(k, 1e-6) / limit, max(v, 1e-6) / limit) for k, v in kv_absmax(model, num_layers, samples))


__all__ = ["kv_absmax", "kv_scales"]
