"""Load a pre-quantized checkpoint dense: transformers builds the model without its quantizer, then each
quantized linear gets the dense weight its quantized tensors stand for."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.models.quantized_checkpoint import QuantizedLinears


def strip_quantization(config: Any) -> None:
    """Remove `quantization_config` so transformers builds plain linears (and demands no quantization package)."""
    for cfg in {id(c): c for c in (config, getattr(config, "text_config", None)) if c is not None}.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def load_dense_weights(model: torch.nn.Module, quantized: QuantizedLinears, missing: list[str]) -> None:
    """Copy each quantized linear's dequantized weight into the model; every weight transformers found
    missing must be one of them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(name for name in quantized.weights if name not in params)
    uncovered = sorted(set(missing) - set(quantized.weights))
    if unknown or uncovered:
        raise KilnError(
            f"quantized checkpoint does not match its model: quantized tensors for no parameter {unknown[:3]}, "
            f"parameters with no weight {uncovered[:3]}"
        )
    with torch.no_grad():
        for name, weight in quantized.weights.items():
            param = params[name]
            if tuple(param.shape) != weight.shape:
                raise KilnError(f"{name}: quantized weight is {list(weight.shape)}, the model's {list(param.shape)}")
            param.copy_(weight.dequantize(param.dtype))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report: a quantized checkpoint's packed tensors are expected to be unused."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
