"""`kiln build`: checkpoint -> captured, rewritten, compiled engine directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kiln.compiler import inductor
from kiln.compiler.capture import CacheShape, capture, mixed_step_inputs
from kiln.compiler.passes import PassContext, run_passes
from kiln.compiler.verify import check_programs_agree
from kiln.config import BuildConfig, torch_dtype
from kiln.engine_dir import (
    COMPILED,
    FORMAT_VERSION,
    TOKENIZER_DIR,
    Manifest,
    ModelFacts,
    describe_device,
    write_manifest,
)
from kiln.errors import KilnError, UnsupportedModelError
from kiln.kernels.selection import selected
from kiln.models.loader import load_checkpoint
from kiln.program_files import ProgramWrite
from kiln.progress import Progress
from kiln.version import __version__


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KilnError("--device cuda was asked for, but torch sees no CUDA GPU here")
    return torch.device(name)


def cache_shape(config: Any) -> CacheShape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return CacheShape(num_layers=text.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim)


def _check_cache_shape(program: torch.export.ExportedProgram, shape: CacheShape, architecture: str) -> None:
    """The keys each attention site produces must fit the cache layout derived from the config."""
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.kiln.attention_site.default:
            _, heads, dim = node.args[1].meta["val"].shape
            value_dim = node.args[2].meta["val"].shape[2]
            if (heads, dim, value_dim) != (shape.num_kv_heads, shape.head_dim, shape.head_dim):
                raise UnsupportedModelError(
                    f"{architecture} layer {node.args[3]} has keys of {heads} heads x {dim} (values {value_dim}), "
                    f"but its config says {shape.num_kv_heads} x {shape.head_dim}; "
                    "kiln needs one cache layout for all layers"
                )


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def model_facts(loaded: Any, shape: CacheShape) -> ModelFacts:
    config = loaded.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    gen = loaded.generation_config
    eos = _ids(getattr(gen, "eos_token_id", None)) or _ids(getattr(text, "eos_token_id", None))
    eos = eos or _ids(loaded.tokenizer.eos_token_id)
    bos = getattr(text, "bos_token_id", None)
    pad = getattr(text, "pad_token_id", None)
    return ModelFacts(
        architecture=loaded.recipe.architecture,
        model_type=str(getattr(config, "model_type", "")),
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=int(text.vocab_size),
        max_position_embeddings=getattr(text, "max_position_embeddings", None),
        eos_token_ids=tuple(eos),
        bos_token_id=bos if isinstance(bos, int) else None,
        pad_token_id=pad if isinstance(pad, int) else None,
        has_chat_template=bool(getattr(loaded.tokenizer, "chat_template", None)),
    )


def build_engine(
    checkpoint: str | Path, output: str | Path, config: BuildConfig, *, progress: Progress | None = None
) -> Path:
    """Build into a staging directory beside `output`; an engine already there is replaced only on success."""
    progress = progress or Progress(enabled=False)
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not (output / "manifest.json").is_file():
        raise KilnError(f"{output} exists and is not a kiln engine; refusing to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with selected(pdl=config.pdl):  # the kernels of the compile and verify steps launch as the engine's will
            _write_engine(checkpoint, staging, config, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return output


def _write_engine(checkpoint: str | Path, output: Path, config: BuildConfig, progress: Progress) -> None:
    from kiln.models.vlm_loader import checkpoint_recipe

    if checkpoint_recipe(checkpoint, trust_remote_code=config.trust_remote_code).kind == "vision_language":
        from kiln.compiler.build_vlm import write_vlm_engine

        return write_vlm_engine(checkpoint, output, config, progress)
    device = resolve_device(config.device)
    dtype = torch_dtype(config.dtype)
    with progress.stage("load", str(checkpoint)):
        loaded = load_checkpoint(checkpoint, dtype, device, trust_remote_code=config.trust_remote_code)
        shape = cache_shape(loaded.config)
        facts = model_facts(loaded, shape)
        config = config.resolved(facts.max_position_embeddings)
    progress.note(
        f"{facts.architecture}: {shape.num_layers} layers, {shape.num_kv_heads} KV heads x {shape.head_dim}, "
        f"vocab {facts.vocab_size}"
    )
    with progress.stage("export", f"torch.export, {facts.architecture}"):
        program = capture(
            loaded.model,
            shape,
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
            PassContext(architecture=facts.architecture, num_layers=shape.num_layers, build=config),
            on_pass=lambda name: progress.note(f"pass {name}"),
        )
    del loaded.model
    output.mkdir(parents=True, exist_ok=True)
    with progress.stage("write", "program; its weights go on in the background"):
        writing = ProgramWrite(program, output)
        loaded.tokenizer.save_pretrained(output / TOKENIZER_DIR)
    compiled = False
    with writing:
        if config.compile:
            with progress.stage("compile", f"Inductor on {device.type}"):
                inductor.compile_program(program, output / COMPILED, combo_kernels=config.combo_kernels)
            with progress.stage("verify", "compiled vs captured program"):
                inputs = mixed_step_inputs(shape, dtype, device, config.tokens_per_block)
                progress.note(str(check_programs_agree(program, output / COMPILED, inputs, dtype)))
            compiled = True
            progress.note(f"compiled program: {(output / COMPILED).stat().st_size / 1e6:.1f} MB")
        with progress.stage("write weights", "waiting for the background write"):
            writing.wait()
    del program
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
    )
    write_manifest(output, manifest)
