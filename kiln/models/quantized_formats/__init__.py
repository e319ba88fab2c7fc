"""Readers of pre-quantized checkpoints (AWQ, GPTQ, compressed-tensors), from raw safetensors tensors.

Each reader turns its format's packed tensors into kiln's unpacked `QuantizedWeight`s; the loader
builds the model dense with the weights they stand for (see `pretrained` and `dense`).
"""

from kiln.models.quantized_formats.dense import load_dense_weights, quiet_transformers, strip_quantization
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError
from kiln.models.quantized_formats.names import by_model_names, model_names
from kiln.models.quantized_formats.pretrained import CheckpointQuantization, from_pretrained_dense
from kiln.models.quantized_formats.registry import READERS, check_files, reader_for
from kiln.models.quantized_formats.tensors import CheckpointTensors

__all__ = [
    "READERS",
    "CheckpointQuantization",
    "CheckpointTensors",
    "UnsupportedQuantizationError",
    "by_model_names",
    "check_files",
    "from_pretrained_dense",
    "load_dense_weights",
    "model_names",
    "quiet_transformers",
    "reader_for",
    "strip_quantization",
]
