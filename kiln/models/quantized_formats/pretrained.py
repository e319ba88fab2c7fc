"""What the text and vision-language loaders share for a checkpoint that may be pre-quantized: find its
format before anything is built, then build the model dense with transformers and fill in the weights."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats.dense import load_dense_weights, quiet_transformers, strip_quantization
from kiln.models.quantized_formats.names import by_model_names
from kiln.models.quantized_formats.registry import FormatReader, reader_for
from kiln.models.quantized_formats.tensors import CheckpointTensors


@dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint directory's raw tensors and the reader of its quantization (None: not quantized)."""

    tensors: CheckpointTensors
    reader: FormatReader | None

    @classmethod
    def of(cls, path: Path) -> CheckpointQuantization:
        """Raises UnsupportedQuantizationError for a format kiln does not read."""
        tensors = CheckpointTensors(path)
        return cls(tensors, reader_for(path, tensors))

    def read(self, dtype: torch.dtype) -> QuantizedLinears | None:
        """The quantized linears, keyed by the checkpoint's names (see `from_pretrained_dense`)."""
        return self.reader.read(self.tensors, dtype) if self.reader is not None else None


def from_pretrained_dense(
    load: Callable[..., Any], path: Path, config: Any, quantized: QuantizedLinears | None, **kwargs: Any
) -> tuple[torch.nn.Module, QuantizedLinears | None]:
    """`load(path, config=config, **kwargs)` (a transformers `from_pretrained`); for a quantized checkpoint
    without its quantizer, then with the dense weights the quantized linears stand for.

    Returns the model and `quantized` keyed by the model's parameter names."""
    if quantized is not None:
        strip_quantization(config)
    with quiet_transformers() if quantized is not None else nullcontext():
        model, info = load(path, config=config, output_loading_info=True, **kwargs)
    if quantized is not None:
        quantized = by_model_names(quantized, model)
        load_dense_weights(model, quantized, list(info["missing_keys"]))
    return model, quantized
