"""What a build quantizes with: the checkpoint's own quantized linears, AWQ's, or round-to-nearest in the pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.config import BuildConfig, check_quantization_method
from kiln.engine.manifest import QuantizationFacts
from kiln.errors import KilnError
from kiln.models.quantized_checkpoint import QuantizedLinears

# --quantization values that agree with a pre-quantized checkpoint's format (int4 only).
SAME_AS_CHECKPOINT = {"awq": "int4_awq", "gptq": "int4_gptq"}
CALIBRATION_TOKENS = 512  # tokens per AWQ calibration sample


RTN_BITS = {"int8_wo": 8, "int4_wo": 4, "int4_awq": 4}


def check_request(config: BuildConfig, quantized: QuantizedLinears | None, checkpoint: str | Path) -> None:
    """Refuse a --quantization that conflicts with a pre-quantized checkpoint, GPTQ without one, AWQ
    without calibration text, and --quantize-lm-head with nothing quantized."""
    if config.quantize_lm_head and quantized is None and config.quantization == "none":
        raise KilnError("--quantize-lm-head quantizes lm_head with the other linears: give --quantization too")
    if quantized is not None:
        check_quantization_method(quantized.method)
        agreeing = SAME_AS_CHECKPOINT.get(quantized.method) if quantized.bits == 4 else None
        if config.quantization not in ("none", agreeing):
            raise KilnError(
                f"{checkpoint} is already quantized ({quantized.method}, {quantized.bits} bits); "
                f"build it without --quantization (got {config.quantization})"
            )
    elif config.quantization == "int4_awq" and config.calib_data is None:
        raise KilnError("int4_awq searches its scales on calibration text: give --calib-data FILE")
    elif config.quantization == "int4_gptq":
        raise KilnError(
            "int4_gptq builds a GPTQ checkpoint (one whose config.json has a quantization_config); "
            f"{checkpoint} is not one, and kiln does not run GPTQ itself: use int4_awq or int4_wo"
        )


def engine_quantization(
    config: BuildConfig, quantized: QuantizedLinears | None, layers: tuple[str, ...]
) -> QuantizationFacts | None:
    """The manifest's quantization block for the layers the pass quantized (None: a dense engine)."""
    if quantized is None and config.quantization == "none":
        return None
    if not layers:
        raise KilnError("the quantization pass found no linear to quantize: kiln cannot build this model quantized")
    group_size: int | None
    if quantized is not None and config.quantization != "int4_awq":
        method, bits, group_size = quantized.method, quantized.bits, quantized.group_size
    else:
        method, bits = config.quantization, RTN_BITS[config.quantization]
        group_size = config.group_size if bits == 4 else None
    return QuantizationFacts(
        method=method, bits=bits, group_size=group_size, layers=layers, lm_head=config.quantize_lm_head
    )


def awq_linears(config: BuildConfig, model: torch.nn.Module, tokenizer: Any) -> QuantizedLinears:
    """int4_awq: kiln's AWQ search over the calibration text (it also rewrites the model's dense weights)."""
    try:
        from kiln.compiler.quantize.awq import awq_quantize  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise KilnError(
            "int4_awq needs kiln.compiler.quantize.awq (kiln's AWQ search), which this kiln does not have; "
            "build with --quantization int4_wo instead"
        ) from exc
    ids = calibration_ids(tokenizer, config.calib_data, config.calib_size)
    return awq_quantize(model, ids, config.group_size)  # type: ignore[no-any-return]


def calibration_ids(tokenizer: Any, path: str | None, samples: int) -> torch.Tensor:
    """Up to `samples` rows of CALIBRATION_TOKENS token ids from the text file at `path` (int64 [rows, tokens])."""
    if path is None:
        raise KilnError("int4_awq needs calibration text: --calib-data FILE")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KilnError(f"cannot read the calibration text {path}: {exc}") from exc
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if ids.numel() == 0:
        raise KilnError(f"the calibration text {path} is empty")
    length = min(CALIBRATION_TOKENS, ids.numel())
    rows = min(samples, ids.numel() // length)
    return ids[: rows * length].reshape(rows, length)


__all__ = ["RTN_BITS", "awq_linears", "calibration_ids", "check_request", "engine_quantization"]
