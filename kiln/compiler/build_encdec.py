"""`kiln build` of an encoder-decoder checkpoint: an encoder program (encoder/) and a decoder program."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kiln.compiler.capture_encdec import decoder_spec, encoder_spec
from kiln.compiler.model_facts import model_facts, resolve_device
from kiln.compiler.pipeline import EngineFacts, WrittenProgram, build_program, write_engine_manifest
from kiln.compiler.program_spec import CacheShape
from kiln.config import BuildConfig, torch_dtype
from kiln.engine.manifest import TOKENIZER_DIR, EncoderDecoderFacts
from kiln.errors import KilnError
from kiln.models.encdec import EncoderDecoderFamily, decoder_prefix
from kiln.models.encdec.loader import load_encoder_decoder
from kiln.progress import Progress


def resolve_encoder_len(config: BuildConfig, max_positions: int | None, prefix_len: int) -> BuildConfig:
    """The config with max_encoder_input_len set (default: max_input_len), checked against the model's
    positions and the step budget (an encoder input runs whole, with the decoder's first tokens)."""
    length = config.max_encoder_input_len or config.input_len
    if max_positions is not None and length > max_positions:
        raise KilnError(
            f"max_encoder_input_len {length} exceeds the model's max_position_embeddings ({max_positions}); "
            f"build with --max-encoder-input-len {max_positions} or less"
        )
    if length + prefix_len > config.max_num_tokens:
        raise KilnError(
            f"max_num_tokens ({config.max_num_tokens}) must hold a whole encoder input and the decoder's first "
            f"tokens ({length} + {prefix_len}): raise --max-num-tokens or lower --max-encoder-input-len"
        )
    return dataclasses.replace(config, max_encoder_input_len=length)


def write_encdec_engine(checkpoint: str | Path, output: Path, config: BuildConfig, progress: Progress) -> None:
    if config.quantization != "none" or config.kv_cache_dtype != "auto":
        raise KilnError(
            "kiln builds encoder-decoder models unquantized only (--quantization none, --kv-cache-dtype auto)"
        )
    device = resolve_device(config.device)
    dtype = torch_dtype(config.dtype)
    with progress.stage("load", str(checkpoint)):
        loaded, family = load_encoder_decoder(checkpoint, dtype, device)
        shape = CacheShape(*family.cache_shape(loaded.config))
        facts = model_facts(loaded, shape)
        prefix = decoder_prefix(loaded.config, loaded.generation_config)
        config = config.resolved(family.max_positions(loaded.config))
        config = resolve_encoder_len(config, family.max_positions(loaded.config), len(prefix))
    progress.note(
        f"{facts.architecture}: {shape.num_layers} decoder layers, {shape.num_kv_heads} heads x {shape.head_dim}, "
        f"max_encoder_input_len {config.max_encoder_input_len}"
    )
    output.mkdir(parents=True, exist_ok=True)
    written, encoder_decoder = build_encdec_programs(
        loaded.model, family, shape, config, output, progress, architecture=facts.architecture, prefix=prefix
    )
    loaded.tokenizer.save_pretrained(output / TOKENIZER_DIR)
    engine = EngineFacts(
        config=config,
        model=facts,
        compiled=written.compiled,
        source_checkpoint=str(Path(checkpoint).resolve()),
        op_modules=written.op_modules,
        encoder_decoder=encoder_decoder,
    )
    write_engine_manifest(output, engine, device, progress)


def build_encdec_programs(
    model: Any,
    family: EncoderDecoderFamily,
    shape: CacheShape,
    config: BuildConfig,
    output: Path,
    progress: Progress,
    *,
    architecture: str,
    prefix: tuple[int, ...],
    image_hidden: int | None = None,
) -> tuple[WrittenProgram, EncoderDecoderFacts]:
    """The encoder program (with image rows when `image_hidden`: a vision-language model's language model)
    and the decoder program of `model`; the decoder's written program (with both programs' operator
    modules) and the manifest's encoder-decoder facts."""
    device = resolve_device(config.device)
    common: dict[str, Any] = dict(
        dtype=torch_dtype(config.dtype), device=device, block_size=config.tokens_per_block, architecture=architecture
    )
    encoder = family.encoder(model)
    encoder_written = build_program(
        encoder_spec(encoder, shape, max_num_tokens=config.max_num_tokens, image_hidden=image_hidden, **common),
        output,
        config,
        progress,
    )
    decoder = family.decoder(model)
    written = build_program(
        decoder_spec(
            decoder,
            shape,
            max_num_tokens=config.max_num_tokens,
            max_batch_size=config.max_batch_size,
            decoder_prompt=family.decoder_prompt,
            **common,
        ),
        output,
        config,
        progress,
    )
    assert config.max_encoder_input_len is not None
    facts = EncoderDecoderFacts(
        max_encoder_input_len=config.max_encoder_input_len,
        decoder_prefix=prefix,
        encoder_compiled=encoder_written.compiled,
        decoder_prompt=family.decoder_prompt,
    )
    return dataclasses.replace(written, op_modules={**encoder_written.op_modules, **written.op_modules}), facts
