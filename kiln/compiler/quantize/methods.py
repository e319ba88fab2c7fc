"""What a build quantizes with: the checkpoint's quantized linears, AWQ's, FP8's, or round-to-nearest in the pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.compiler.model_facts import resolve_device
from kiln.compiler.quantize.calibration import calibration_ids as cut_calibration_text
from kiln.config import BuildConfig, check_quantization_method
from kiln.engine.manifest import KVCacheFacts, QuantizationFacts
from kiln.errors import KilnError
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.progress import Progress

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
    elif config.kv_cache_dtype == "int8" and config.calib_data is None:
        raise KilnError("an int8 KV cache needs per-layer scales from calibration text: give --calib-data")
    elif config.kv_cache_dtype != "auto" and config.calib_data is not None and not Path(config.calib_data).is_file():
        raise KilnError(f"cannot read the calibration text {config.calib_data}: no such file")
    elif config.quantization == "int8_sq" and config.calib_data is None:
        raise KilnError("int8_sq (SmoothQuant) computes its smoothing scales on calibration text: give --calib-data")
    elif config.quantization == "int8_sq" and not Path(str(config.calib_data)).is_file():
        raise KilnError(f"cannot read the calibration text {config.calib_data}: no such file")
    elif config.quantization == "fp8" and config.act_scales == "tensor" and config.calib_data is None:
        raise KilnError("fp8 with static activation scales (--act-scales tensor) calibrates them: give --calib-data")
    elif config.quantization == "fp8" and config.calib_data is not None and not Path(config.calib_data).is_file():
        raise KilnError(f"cannot read the calibration text {config.calib_data}: no such file")
    elif config.quantization == "int4_awq" and config.calib_data is None:
        raise KilnError("int4_awq searches its scales on calibration text: give --calib-data FILE")
    elif config.quantization == "int4_awq" and not Path(str(config.calib_data)).is_file():
        raise KilnError(f"cannot read the calibration text {config.calib_data}: no such file")
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
    if quantized is not None and config.quantization in ("fp8", "int8_sq"):
        method, bits, group_size = config.quantization, 8, None
    elif quantized is not None and config.quantization != "int4_awq":
        method, bits, group_size = quantized.method, quantized.bits, quantized.group_size
    else:
        method, bits = config.quantization, RTN_BITS[config.quantization]
        group_size = config.group_size if bits == 4 else None
    return QuantizationFacts(
        method=method,
        bits=bits,
        group_size=group_size,
        layers=layers,
        lm_head=config.quantize_lm_head,
        activations=activations_of(quantized),
        weights="fp8" if quantized is not None and uses_fp8(quantized) else "int",
    )


def uses_fp8(quantized: QuantizedLinears) -> bool:
    """Whether any of these weights is FP8 (E4M3)."""
    return any(w.values.dtype == torch.float8_e4m3fn for w in quantized.weights.values())


def activations_of(quantized: QuantizedLinears | None) -> str | None:
    """How the engine quantizes its linears' inputs, for the manifest (None: weight-only)."""
    weights = [] if quantized is None else list(quantized.weights.values())
    modes = {w.activations for w in weights} - {"none"}
    if not modes:
        return None
    kind = "fp8" if weights[0].values.dtype == torch.float8_e4m3fn else "int8"
    return f"{kind} " + ("dynamic per token" if modes == {"dynamic"} else "static per tensor")


def fp8_build_linears(config: BuildConfig, model: torch.nn.Module, tokenizer: Any) -> QuantizedLinears:
    """--quantization fp8: every linear in E4M3; static input scales from the calibration text."""
    from kiln.compiler.quantize.fp8 import fp8_linears

    samples = full_calibration(config, tokenizer) if config.act_scales == "tensor" else None
    return fp8_linears(model, config.weight_scales == "channel", samples)


def smoothquant_build_linears(config: BuildConfig, model: torch.nn.Module, tokenizer: Any) -> QuantizedLinears:
    """--quantization int8_sq: SmoothQuant's scales folded into the model, then int8 W8A8 linears."""
    from kiln.compiler.quantize.smoothquant import smoothquant

    samples = full_calibration(config, tokenizer)
    per_channel, per_token = config.weight_scales == "channel", config.act_scales == "token"
    return smoothquant(model, samples, config.smoothquant_alpha, per_channel, per_token)


def check_kv_head_dim(config: BuildConfig, head_dim: int) -> None:
    """A narrow KV cache on the GPU is read by Triton kernels that take head sizes 2^n in [16, 256]."""
    if (
        config.kv_cache_dtype != "auto"
        and resolve_device(config.device).type == "cuda"
        and not (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0)
    ):
        raise KilnError(
            f"--kv-cache-dtype {config.kv_cache_dtype}: kiln's Triton attention kernels read an fp8/int8 KV cache for "
            f"head sizes that are powers of two in [16, 256], and this model's is {head_dim}; build with "
            "--kv-cache-dtype auto"
        )


def narrow_kv_scales(
    config: BuildConfig, model: torch.nn.Module | None, tokenizer: Any, num_layers: int, progress: Progress
) -> tuple[tuple[float, float], ...] | None:
    """--kv-cache-dtype fp8 / int8: each layer's (k, v) scales (None: a cache of the model's dtype); the model
    is read only with calibration text."""
    from kiln.compiler.quantize.kv_scales import kv_scales

    if config.kv_cache_dtype == "auto":
        return None
    if config.calib_data is None:
        if config.kv_cache_dtype == "fp8":
            progress.note("fp8 KV cache without --calib-data: scale 1.0 for every layer (recorded in the manifest)")
        return kv_scales(model, num_layers, config.kv_cache_dtype, None)
    with progress.stage("kv scales", f"{config.kv_cache_dtype} KV cache, per-layer scales from {config.calib_data}"):
        return kv_scales(model, num_layers, config.kv_cache_dtype, full_calibration(config, tokenizer))


def narrow_cache(config: BuildConfig, kv_scales: tuple[tuple[float, float], ...] | None) -> KVCacheFacts | None:
    """The manifest's record of a narrow KV cache (every layer's scales), or None for a model-dtype cache."""
    return None if kv_scales is None else KVCacheFacts(config.kv_cache_dtype, kv_scales, config.calib_data is not None)


def full_calibration(config: BuildConfig, tokenizer: Any) -> list[torch.Tensor]:
    """--calib-size samples of the calibration text, or the error saying it is too short."""
    samples = calibration_ids(tokenizer, config.calib_data, config.calib_size)
    if len(samples) < config.calib_size:
        raise KilnError(
            f"the calibration text {config.calib_data} gives {len(samples)} samples of {CALIBRATION_TOKENS} "
            f"tokens, fewer than --calib-size {config.calib_size}: give more text or a smaller --calib-size"
        )
    return samples


def awq_linears(config: BuildConfig, model: torch.nn.Module, tokenizer: Any) -> QuantizedLinears:
    """int4_awq: kiln's AWQ search over the calibration text (it also rewrites the model's dense weights)."""
    from kiln.compiler.quantize.awq import awq_quantize

    return awq_quantize(model, calibration_ids(tokenizer, config.calib_data, config.calib_size), config.group_size)


def calibration_ids(tokenizer: Any, path: str | None, samples: int) -> list[torch.Tensor]:
    """Up to `samples` sequences of CALIBRATION_TOKENS token ids from the text file at `path`."""
    if path is None:
        raise KilnError("calibration needs text: --calib-data FILE")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KilnError(f"cannot read the calibration text {path}: {exc}") from exc
    return cut_calibration_text(tokenizer, text, seq_len=CALIBRATION_TOKENS, max_sequences=samples)


__all__ = [
    "RTN_BITS",
    "activations_of",
    "awq_linears",
    "calibration_ids",
    "check_request",
    "engine_quantization",
    "fp8_build_linears",
    "full_calibration",
    "narrow_cache",
    "narrow_kv_scales",
    "smoothquant_build_linears",
    "uses_fp8",
]
