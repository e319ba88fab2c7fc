"""Tensor-parallel builds that see the model whole before they shard it: AWQ, FP8 and SmoothQuant (their
scales are calibrated on the whole model; AWQ and SmoothQuant fold theirs into the weights) and pre-quantized
checkpoints (AWQ, GPTQ, compressed-tensors: their linears are read whole). The dense checkpoint is loaded
once, quantized as a one-rank build quantizes it, and each rank is cut from it with its quantized linears
(`in_memory.shard_in_memory`): every rank dequantizes exactly the weights the one-rank engine does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kiln.compiler.model_facts import resolve_device
from kiln.compiler.quantize.methods import (
    awq_linears,
    check_request,
    fp8_build_linears,
    smoothquant_build_linears,
    uses_fp8,
)
from kiln.compiler.sharding.in_memory import shard_in_memory
from kiln.compiler.sharding.plans import plan_for
from kiln.config import BuildConfig, torch_dtype
from kiln.errors import KilnError
from kiln.kernels.w8a8_dispatch import fp8_refusal
from kiln.models.loader import LoadedCheckpoint, load_checkpoint
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.models.quantized_formats import CheckpointQuantization
from kiln.progress import Progress

WHOLE_MODEL_METHODS = ("int4_awq", "fp8", "int8_sq")


def needs_whole_model(checkpoint: str | Path, config: BuildConfig) -> bool:
    return config.quantization in WHOLE_MODEL_METHODS or CheckpointQuantization.of(Path(checkpoint)).reader is not None


class WholeModel:
    """The dense model (CPU), its quantized linears, and each rank's shard of both."""

    def __init__(self, checkpoint: str | Path, config: BuildConfig, progress: Progress) -> None:
        self.dtype = torch_dtype(config.dtype)
        with progress.stage("load", f"{checkpoint}, whole (it is quantized before it is sharded)"):
            self.loaded = load_checkpoint(checkpoint, self.dtype, torch.device("cpu"))
        check_request(config, self.loaded.quantized, checkpoint)
        quantized = self.loaded.quantized
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
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
