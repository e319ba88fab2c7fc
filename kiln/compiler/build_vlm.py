"""`kiln build` of a vision-language checkpoint: a vision program and an LLM program in one engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.compiler import inductor
from kiln.compiler.build import _check_cache_shape, cache_shape, model_facts, resolve_device
from kiln.compiler.capture import CacheShape, mixed_step_inputs
from kiln.compiler.capture_mm import capture_llm, capture_vision, llm_input_names, mm_step_inputs
from kiln.compiler.passes import PassContext, run_passes
from kiln.compiler.verify import check_programs_agree
from kiln.config import BuildConfig, torch_dtype
from kiln.engine_dir import (
    COMPILED,
    FORMAT_VERSION,
    PROCESSOR_DIR,
    TOKENIZER_DIR,
    VISION_DIR,
    VISION_STATE,
    Manifest,
    MultimodalFacts,
    describe_device,
    write_manifest,
)
from kiln.models.vlm import VisionExample, VisionLanguageFamily
from kiln.models.vlm_loader import load_vision_language
from kiln.program_files import ProgramWrite, save_program
from kiln.progress import Progress
from kiln.version import __version__


def write_vision(
    family: VisionLanguageFamily,
    model: Any,
    output: Path,
    *,
    limit: int,
    dtype: torch.dtype,
    device: torch.device,
    compile: bool,
    progress: Progress,
    architecture: str,
    combo_kernels: bool = True,
) -> bool:
    """Export, save and (optionally) compile a family's vision program; returns whether it was compiled."""
    example = family.vision_example(model.config, dtype, device, limit)
    state = family.vision_state(model)
    if state:
        from safetensors.torch import save_file

        (output / VISION_DIR).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(output / VISION_DIR / VISION_STATE))
    return write_vision_program(
        family.vision_module(model),
        example,
        output,
        dtype=dtype,
        device=device,
        compile=compile,
        progress=progress,
        architecture=architecture,
        limit=limit,
        combo_kernels=combo_kernels,
    )


def write_vision_program(
    module: torch.nn.Module,
    example: VisionExample,
    output: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    compile: bool,
    progress: Progress,
    architecture: str,
    limit: int,
    combo_kernels: bool = True,
) -> bool:
    """Export `module` on `example` (dynamic dimension up to `limit`) into output/vision/; compile and verify it."""
    vision_dir = output / VISION_DIR
    vision_dir.mkdir(parents=True, exist_ok=True)
    with progress.stage("export vision", f"vision encoder, dynamic batch up to {limit}"):
        program = capture_vision(module, example.args, example.dynamic_shapes, architecture)
        save_program(program, vision_dir)
    if not compile:
        return False
    with progress.stage("compile vision", f"Inductor on {device.type}"):
        inductor.compile_program(program, vision_dir / COMPILED, combo_kernels=combo_kernels)
    with progress.stage("verify vision", "compiled vs captured vision program"):
        progress.note(str(check_programs_agree(program, vision_dir / COMPILED, example.args, dtype)))
    return True


def write_vlm_engine(checkpoint: str | Path, output: Path, config: BuildConfig, progress: Progress) -> None:
    device = resolve_device(config.device)
    dtype = torch_dtype(config.dtype)
    with progress.stage("load", str(checkpoint)):
        loaded, family, processor = load_vision_language(checkpoint, dtype, device)
        shape = cache_shape(loaded.config)
        facts = model_facts(loaded, shape)
        config = config.resolved(facts.max_position_embeddings)
    text_config = family.text_config(loaded.config)
    mm_len = config.max_multimodal_len or family.default_max_multimodal_len(loaded.config, config.max_batch_size)
    limit = family.vision_batch_limit(loaded.config, mm_len)
    progress.note(
        f"{facts.architecture}: {shape.num_layers} layers, vision batch limit {limit}, max_multimodal_len {mm_len}"
    )
    output.mkdir(parents=True, exist_ok=True)
    vision_compiled = write_vision(
        family,
        loaded.model,
        output,
        limit=limit,
        dtype=dtype,
        device=device,
        compile=config.compile,
        progress=progress,
        architecture=facts.architecture,
        combo_kernels=config.combo_kernels,
    )
    family.detach_vision(loaded.model)
    hidden = int(text_config.hidden_size)
    names = llm_input_names(family.bidirectional_images)
    with progress.stage("export", f"torch.export, language model of {facts.architecture}"):
        program = capture_llm(
            family.text_model(loaded.model),
            shape,
            hidden=hidden,
            position_rows=family.position_rows,
            bidirectional=family.bidirectional_images,
            dtype=dtype,
            device=device,
            block_size=config.tokens_per_block,
            max_num_tokens=config.max_num_tokens,
            max_batch_size=config.max_batch_size,
            architecture=facts.architecture,
        )
        _check_cache_shape(program, shape, facts.architecture)
    with progress.stage("passes"):
        program = run_passes(
            program,
            PassContext(architecture=facts.architecture, num_layers=shape.num_layers, input_names=names, build=config),
            on_pass=lambda name: progress.note(f"pass {name}"),
        )
    del loaded.model
    with progress.stage("write", "program; its weights go on in the background"):
        writing = ProgramWrite(program, output)
        loaded.tokenizer.save_pretrained(output / TOKENIZER_DIR)
        processor.save_pretrained(output / PROCESSOR_DIR)
    compiled = False
    with writing:
        if config.compile:
            with progress.stage("compile", f"Inductor on {device.type}"):
                inductor.compile_program(program, output / COMPILED, combo_kernels=config.combo_kernels)
            with progress.stage("verify", "compiled vs captured program"):
                inputs = _llm_check_inputs(shape, dtype, device, config.tokens_per_block, hidden, family)
                progress.note(str(check_programs_agree(program, output / COMPILED, inputs, dtype)))
            compiled = True
        with progress.stage("write weights", "waiting for the background write"):
            writing.wait()
    manifest = Manifest(
        kiln_version=__version__,
        torch_version=torch.__version__,
        transformers_version=__import__("transformers").__version__,
        format_version=FORMAT_VERSION,
        device=describe_device(device),
        build=config,
        model=facts,
        compiled=compiled,
        timings_s=dict(progress.timings),
        source_checkpoint=str(Path(checkpoint).resolve()),
        multimodal=MultimodalFacts(
            image_token_id=family.image_token_id(loaded.config),
            hidden_size=hidden,
            max_multimodal_len=mm_len,
            vision_batch_limit=limit,
            position_rows=family.position_rows,
            bidirectional_images=family.bidirectional_images,
            vision_compiled=vision_compiled,
            family_config=family.runtime_config(loaded.config),
        ),
    )
    write_manifest(output, manifest)


def _llm_check_inputs(
    shape: CacheShape, dtype: torch.dtype, device: torch.device, block_size: int, hidden: int, family: Any
) -> tuple[torch.Tensor, ...]:
    base = mixed_step_inputs(shape, dtype, device, block_size)
    return mm_step_inputs(base, hidden, family.position_rows, family.bidirectional_images, dtype)
