"""`kiln build`: checkpoint -> the specs of its programs -> an engine directory, built in a staging directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kiln.compiler.build_encdec import write_encdec_engine
from kiln.compiler.build_vlm import write_vlm_engine
from kiln.compiler.capture import text_spec
from kiln.compiler.model_facts import cache_shape, model_facts, resolve_device
from kiln.compiler.pipeline import EngineFacts, build_program, write_engine_manifest
from kiln.compiler.program_spec import CacheShape, ProgramSpec
from kiln.compiler.quantize.methods import (
    awq_linears,
    check_kv_head_dim,
    check_request,
    engine_quantization,
    fp8_build_linears,
    narrow_cache,
    narrow_kv_scales,
    smoothquant_build_linears,
    uses_fp8,
)
from kiln.compiler.sharding.launched import BuildLaunch
from kiln.config import BuildConfig, kv_cache_torch_dtype, torch_dtype
from kiln.engine.manifest import TOKENIZER_DIR
from kiln.errors import KilnError
from kiln.kernels.w8a8_dispatch import fp8_refusal
from kiln.models.loader import LoadedCheckpoint, load_checkpoint
from kiln.progress import Progress


def build_engine(
    checkpoint: str | Path, output: str | Path, config: BuildConfig, *, progress: Progress | None = None
) -> Path:
    """Build into a staging directory beside `output`; an engine already there is replaced only on success."""
    progress = progress or Progress(enabled=False)
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not (output / "manifest.json").is_file():
        raise KilnError(f"{output} exists and is not a kiln engine; refusing to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    launch = BuildLaunch.from_env(config)  # one of torchrun's processes: they share one staging directory
    staging = output.parent / f".{output.name}.partial-{os.getpid() if launch is None else launch.run_id}"
    if launch is None:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_engine(checkpoint, staging, config, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if launch is not None and not launch.leads:
        return output  # rank 0 moves the engine into place once every rank's program is written
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return output


def _write_engine(checkpoint: str | Path, output: Path, config: BuildConfig, progress: Progress) -> None:
    from kiln.models.vlm_loader import checkpoint_recipe

    kind = checkpoint_recipe(checkpoint, trust_remote_code=config.trust_remote_code).kind
    if kind == "encoder_decoder" and (config.tp_size > 1 or config.pp_size > 1):
        raise KilnError("encoder-decoder checkpoints are built with --tp-size 1 and --pp-size 1 only (for now)")
    if kind == "vision_language":
        return write_vlm_engine(checkpoint, output, config, progress)
    if kind == "encoder_decoder":
        return write_encdec_engine(checkpoint, output, config, progress)
    if config.max_encoder_input_len is not None:
        raise KilnError("--max-encoder-input-len applies to encoder-decoder checkpoints (T5, BART, mBART) only")
    if config.pp_size > 1:
        from kiln.compiler.sharding.stages import write_pipeline_engine

        return write_pipeline_engine(checkpoint, output, config, progress)
    if config.tp_size > 1:
        from kiln.compiler.sharding.build import write_sharded_engine

        return write_sharded_engine(checkpoint, output, config, progress)
    device = resolve_device(config.device)
    dtype = torch_dtype(config.dtype)
    with progress.stage("load", str(checkpoint)):
        loaded = load_checkpoint(checkpoint, dtype, device, trust_remote_code=config.trust_remote_code)
        shape = cache_shape(loaded.config)
        facts = model_facts(loaded, shape)
        config = config.resolved(facts.max_position_embeddings)
        check_request(config, loaded.quantized, checkpoint)
    progress.note(
        f"{facts.architecture}: {shape.num_layers} layers, {shape.num_kv_heads} KV heads x {shape.head_dim}, "
        f"vocab {facts.vocab_size}"
    )
    check_kv_head_dim(config, shape.head_dim)
    kv_scales = narrow_kv_scales(config, loaded.model, loaded.tokenizer, shape.num_layers, progress)
    quantized = loaded.quantized
    if config.quantization == "int4_awq" and quantized is None:
        with progress.stage("awq", f"activation-aware int4 scales, groups of {config.group_size}"):
            quantized = awq_linears(config, loaded.model, loaded.tokenizer)
    fp8 = "fp8" in (config.quantization, config.kv_cache_dtype) or (quantized is not None and uses_fp8(quantized))
    refusal = fp8_refusal(resolve_device(config.device)) if fp8 else None
    if refusal is not None:
        raise KilnError(refusal)
    if config.quantization == "fp8" and quantized is None:
        with progress.stage("fp8", f"E4M3 per {config.weight_scales}, activations per {config.act_scales}"):
            quantized = fp8_build_linears(config, loaded.model, loaded.tokenizer)
    if config.quantization == "int8_sq" and quantized is None:
        with progress.stage("smoothquant", f"alpha {config.smoothquant_alpha}, int8 W8A8"):
            quantized = smoothquant_build_linears(config, loaded.model, loaded.tokenizer)
    written = build_program(  # the spec is handed over: no reference here keeps the source weights alive
        _text_program(loaded, shape, config, architecture=facts.architecture),
        output,
        config,
        progress,
        quantized,
        kv_scales,
    )
    loaded.tokenizer.save_pretrained(output / TOKENIZER_DIR)
    engine = EngineFacts(
        config=config,
        model=facts,
        compiled=written.compiled,
        source_checkpoint=str(Path(checkpoint).resolve()),
        op_modules=written.op_modules,
        passes=written.passes,
        quantization=engine_quantization(config, quantized, written.quantized_layers),
        kv_cache=narrow_cache(config, kv_scales),
    )
    write_engine_manifest(output, engine, device, progress)


def _text_program(
    loaded: LoadedCheckpoint,
    shape: CacheShape,
    config: BuildConfig,
    *,
    architecture: str,
) -> ProgramSpec:
    """The text program's spec, which takes the model over from `loaded`."""
    spec = text_spec(
        loaded.model,
        shape,
        dtype=kv_cache_torch_dtype(config),  # the example cache's
        device=resolve_device(config.device),
        block_size=config.tokens_per_block,
        max_num_tokens=config.max_num_tokens,
        max_batch_size=config.max_batch_size,
        architecture=architecture,
    )
    del loaded.model  # only the spec holds the model now
    return spec
