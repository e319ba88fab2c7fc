"""Which reader a checkpoint's `quantization_config["quant_method"]` selects, and the formats kiln refuses.

Readers take every module that has its format's packed tensors, and only those: the modules a checkpoint left
dense (AWQ/GPTQ `modules_to_not_convert`, compressed-tensors `ignore`: a VLM's vision tower and projector,
`lm_head`) keep a plain `.weight` and load as any dense weight, so those lists need no reading.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats.awq import AwqFormat
from kiln.models.quantized_formats.compressed_tensors import CompressedTensorsFormat
from kiln.models.quantized_formats.errors import UnsupportedQuantizationError
from kiln.models.quantized_formats.fp8 import BlockFp8Format
from kiln.models.quantized_formats.gptq import GptqFormat
from kiln.models.quantized_formats.tensors import CheckpointTensors


class FormatReader(Protocol):
    def read(self, tensors: CheckpointTensors, dtype: torch.dtype) -> QuantizedLinears: ...


READERS: dict[str, Callable[[dict[str, Any]], FormatReader]] = {
    "awq": AwqFormat.from_config,
    "gptq": GptqFormat.from_config,
    "compressed-tensors": CompressedTensorsFormat.from_config,
    "fp8": BlockFp8Format.from_config,
}

REFUSED: dict[str, str] = {
    "bitsandbytes": "bitsandbytes checkpoints (load_in_4bit / load_in_8bit, NF4 / FP4) are not supported",
    "exl2": "EXL2 (exllamav2) checkpoints are not supported",
}

# Tensor names only an EXL2 checkpoint has (exllamav2 writes no quantization_config).
EXL2_SUFFIXES = (".q_invperm", ".q_scale_max", ".q_groups")
# Tensor names of the packed linears kiln reads: found without a quantization_config, they are an error.
PACKED_SUFFIXES = (".qweight", ".weight_packed")


def quantization_config(path: Path) -> dict[str, Any] | None:
    """The raw `quantization_config` of `path/config.json`, or of its `text_config` (a VLM whose language model
    alone was quantized); None when absent or unreadable."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    text = raw.get("text_config")
    qc = raw.get("quantization_config") or (text.get("quantization_config") if isinstance(text, dict) else None)
    return qc if isinstance(qc, dict) else None


def check_files(path: Path) -> None:
    """Refuse a directory of GGUF files before anything else looks for safetensors in it."""
    gguf = sorted(p.name for p in path.glob("*.gguf")) if path.is_dir() else []
    if gguf:
        raise UnsupportedQuantizationError(
            f"{path} holds GGUF files ({', '.join(gguf[:3])}): GGUF (llama.cpp) checkpoints are not supported; "
            "kiln reads Hugging Face safetensors checkpoints"
        )


def reader_for(path: Path, tensors: CheckpointTensors) -> FormatReader | None:
    """The reader for the checkpoint's quantization (None: not quantized), or the error saying why not."""
    exl2 = [name for name in tensors.names() if name.endswith(EXL2_SUFFIXES)]
    if exl2:
        raise UnsupportedQuantizationError(f"{path} is an EXL2 (exllamav2) checkpoint ({exl2[0]}): not supported")
    qc = quantization_config(path)
    if qc is None:
        packed = [name for name in tensors.names() if name.endswith(PACKED_SUFFIXES)]
        if packed:
            raise UnsupportedQuantizationError(
                f"{path} holds packed quantized tensors ({packed[0]}) but its config.json has no "
                "quantization_config saying their format"
            )
        return None
    method = str(qc.get("quant_method", "")).lower()
    if qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        method = "bitsandbytes"
    if method in REFUSED:
        raise UnsupportedQuantizationError(f"{path}: {REFUSED[method]}")
    if method not in READERS:
        raise UnsupportedQuantizationError(f"{path}: quantization method {method!r} is not supported")
    return READERS[method](qc)
