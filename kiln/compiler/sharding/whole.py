"""Tensor-parallel builds that see the model whole before they shard it: AWQ, FP8 and SmoothQuant (their
scales are calibrated on the whole model; AWQ and SmoothQuant fold theirs into the weights) and pre-quantized
checkpoints (AWQ, GPTQ, compressed-tensors: their linears are read whole). The dense checkpoint is loaded
once, quantized as a one-rank build quantizes it, and each rank is cut from it with its quantized linears
(`in_memory.shard_in_memory`): every rank dequantizes exactly the weights the one-rank engine does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kiln.compiler.model_facts import cache_shape, resolve_device
from kiln.compiler.quantize.methods import (
    awq_linears,
    check_kv_head_dim,
    check_request,
    fp8_build_linears,
    narrow_kv_scales,
    smoothquant_build_linears,
    uses_fp8,
)
from kiln.compiler.sharding.in_memory import shard_in_memory
from kiln.compiler.sharding.plans import plan_for
from kiln.config import BuildConfig, torch_dtype
from kiln.errors import KilnError
from kiln.kernels.w8a8_dispatch import fp8_refusal
from kiln.models.loader import LoadedCheckpoint, load_checkpoint, load_config
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats import CheckpointQuantization
from kiln.progress import Progress

WHOLE_MODEL_METHODS = ("int4_awq", "fp8", "int8_sq")


def needs_whole_model(checkpoint: str | Path, config: BuildConfig) -> bool:
    return config.quantization in WHOLE_MODEL_METHODS or CheckpointQuantization.of(Path(checkpoint)).reader is not None


KVScales = tuple[tuple[float, float], ...]


def sharded_kv_scales(
    checkpoint: str | Path, config: BuildConfig, whole: "WholeModel | None", progress: Progress
) -> KVScales | None:
    """A narrow KV cache's per-layer (k, v) scales for every rank: those of the whole model, as a one-rank
    build calibrates them (FP8 without calibration text: 1.0). None: a cache of the model's dtype."""
    if config.kv_cache_dtype == "auto":
        return None
    refusal = fp8_refusal(resolve_device(config.device)) if config.kv_cache_dtype == "fp8" else None
    if refusal is not None:
        raise KilnError(refusal)
    if whole is not None:
        return whole.kv_scales
    shape = cache_shape(load_config(Path(checkpoint)))
    check_kv_head_dim(config, shape.head_dim)
    if config.calib_data is None:  # FP8 at scale 1.0 (int8 says it needs calibration text): no model needed
        return narrow_kv_scales(config, None, None, shape.num_layers, progress)
    with progress.stage("load", f"{checkpoint}, whole (its KV cache is calibrated before it is sharded)"):
        loaded = load_checkpoint(checkpoint, torch_dtype(config.dtype), torch.device("cpu"))
    return narrow_kv_scales(config, loaded.model, loaded.tokenizer, shape.num_layers, progress)


class WholeModel:
    """The dense model (CPU), its quantized linears, and each rank's shard of both."""

    def __init__(self, checkpoint: str | Path, config: BuildConfig, progress: Progress) -> None:
        self.dtype = torch_dtype(config.dtype)
        with progress.stage("load", f"{checkpoint}, whole (it is quantized before it is sharded)"):
            self.loaded = load_checkpoint(checkpoint, self.dtype, torch.device("cpu"))
        check_request(config, self.loaded.quantized, checkpoint)
        quantized = self.loaded.quantized
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        shape = cache_shape(self.loaded.config)
        check_kv_head_dim(config, shape.head_dim)
        # calibrated on the dense model before it is quantized, as a one-rank build does
        self.kv_scales = narrow_kv_scales(config, model, tokenizer, shape.num_layers, progress)
        if config.quantization == "int4_awq" and quantized is None:
            with progress.stage("awq", f"activation-aware int4 scales, groups of {config.group_size}"):
                quantized = awq_linears(config, model, tokenizer)
        if config.quantization == "fp8" and quantized is None:
            with progress.stage("fp8", f"E4M3 per {config.weight_scales}, activations per {config.act_scales}"):
                quantized = fp8_build_linears(config, model, tokenizer)
        if config.quantization == "int8_sq" and quantized is None:
            with progress.stage("smoothquant", f"alpha {config.smoothquant_alpha}, int8 W8A8"):
                quantized = smoothquant_build_linears(config, model, tokenizer)
        refusal = fp8_refusal(resolve_device(config.device)) if quantized and uses_fp8(quantized) else None
        if refusal is not None:
            raise KilnError(refusal)
        self.quantized: QuantizedLinears | None = quantized
        self.plan = plan_for(self.loaded.recipe.architecture)

    def shard(self, rank: int, tp_size: int, group: str) -> LoadedCheckpoint:
        """Rank `rank`'s model and quantized linears, with the checkpoint's config and tokenizer."""
        text = self.loaded.config.get_text_config()
        model, quantized = shard_in_memory(
            self.loaded.model, self.plan, rank, tp_size, text, self.dtype, self.quantized, group
        )
        return dataclasses.replace(self.loaded, model=model.eval(), quantized=quantized)
