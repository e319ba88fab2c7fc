"""`kiln build` of a vision-language checkpoint: a vision program and an LLM program in one engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.compiler.build_encdec import build_encdec_programs, resolve_encoder_len
from kiln.compiler.capture_mm import llm_spec, vision_spec
from kiln.compiler.model_facts import cache_shape, model_facts, resolve_device
from kiln.compiler.pipeline import EngineFacts, build_program, write_engine_manifest
from kiln.compiler.program_spec import CacheShape, ProgramSpec
from kiln.compiler.quantize.methods import check_request, engine_quantization
from kiln.compiler.sharding.launched import BuildLaunch
from kiln.config import BuildConfig, torch_dtype
from kiln.engine.manifest import PROCESSOR_DIR, TOKENIZER_DIR, VISION_DIR, VISION_STATE, MultimodalFacts
from kiln.errors import KilnError
from kiln.models.encdec import LANGUAGE_MODELS, decoder_prefix
from kiln.models.loader import LoadedCheckpoint
from kiln.models.vlm import VisionLanguageFamily
from kiln.models.vlm_loader import load_vision_language
from kiln.progress import Progress


def save_vision_state(family: VisionLanguageFamily, model: Any, output: Path) -> None:
    """The tensors the family's run-time hooks read beside the vision program (vision/state.safetensors)."""
    state = family.vision_state(model)
    if not state:
        return
    from safetensors.torch import save_file

    (output / VISION_DIR).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(output / VISION_DIR / VISION_STATE))


def write_vlm_engine(checkpoint: str | Path, output: Path, config: BuildConfig, progress: Progress) -> None:
    device = resolve_device(config.device)
    dtype = torch_dtype(config.dtype)
    with progress.stage("load", str(checkpoint)):
        loaded, family, processor = load_vision_language(checkpoint, dtype, device)
        text_config = family.text_config(loaded.config)
        encdec = LANGUAGE_MODELS.get(type(family.text_model(loaded.model)).__name__)  # BLIP-2 + Flan-T5, Nougat
        shape = CacheShape(*encdec.cache_shape(text_config)) if encdec else cache_shape(loaded.config)
        facts = model_facts(loaded, shape)
        config = config.resolved(facts.max_position_embeddings)
        check_request(config, loaded.quantized, checkpoint)
        if config.quantization == "int4_awq" and loaded.quantized is None:
            raise KilnError("int4_awq quantizes text models only; build a vision-language model with int4_wo")
        if config.kv_cache_dtype != "auto":
            raise KilnError("a narrow KV cache (--kv-cache-dtype fp8/int8) is for text models only for now")
        if config.quantization in ("fp8", "int8_sq") and loaded.quantized is None:
            raise KilnError(
                f"{config.quantization} at build quantizes text models only; build a vision-language model with int8_wo"
            )
        if encdec is not None:
            if config.quantization != "none" or loaded.quantized is not None:
                raise KilnError("kiln builds encoder-decoder language models unquantized only")
            prefix = (
                ()  # Mllama: the prompt's text is the decoder's
                if encdec.decoder_prompt
                else decoder_prefix(encdec.prefix_config(loaded.config, text_config), loaded.generation_config)
            )
            config = resolve_encoder_len(config, encdec.max_positions(text_config), max(len(prefix), 1))
    sharded = config.tp_size > 1 or config.pp_size > 1
    if sharded:
        from kiln.compiler.sharding.vlm import check_sharded_vlm

        check_sharded_vlm(
            config, text_config, facts.architecture, loaded.quantized is not None, encdec is not None,
            (family.position_rows, family.bidirectional_images),
        )  # fmt: skip
    launch = BuildLaunch.from_env(config)  # under torchrun: this process builds its rank's LLM program only
    leads = launch is None or launch.leads
    mm_len = config.max_multimodal_len or family.default_max_multimodal_len(loaded.config, config.max_batch_size)
    limit = family.vision_batch_limit(loaded.config, mm_len)
    progress.note(
        f"{facts.architecture}: {shape.num_layers} layers, vision batch limit {limit}, max_multimodal_len {mm_len}"
    )
    output.mkdir(parents=True, exist_ok=True)
    if leads:  # the vision program is rank 0's
        save_vision_state(family, loaded.model, output)
        example = family.vision_example(loaded.model.config, dtype, device, limit)
        vision_written = build_program(
            vision_spec(family.vision_module(loaded.model), example.args, example.dynamic_shapes, facts.architecture),
            output,
            config,
            progress,
        )
    family.detach_vision(loaded.model)
    hidden = int(text_config.hidden_size)
    quantized = loaded.quantized  # the language model's linears only: the vision program is never quantized
    encoder_decoder, world = None, None
    if sharded:  # the language model's programs in rank0/, rank1/, ...; the vision program unsharded
        from kiln.compiler.sharding.stages import stages_written
        from kiln.compiler.sharding.vlm import build_sharded_llm

        ranks, world = build_sharded_llm(
            family.text_model(loaded.model), text_config, shape, config, output, progress, hidden=hidden,
            position_rows=family.position_rows, bidirectional=family.bidirectional_images,
            architecture=facts.architecture, launch=launch,
        )  # fmt: skip
        if launch is not None:
            ranks = launch.finish_rank(output, ranks[0])
            if not leads:
                return
        written = stages_written(ranks, world.tp_size, shape.num_layers // world.pp_size)
    elif encdec is not None:  # image rows go into the encoder program
        written, encoder_decoder = build_encdec_programs(
            family.text_model(loaded.model), encdec, shape, config, output, progress,
            architecture=facts.architecture, prefix=prefix, image_hidden=hidden,
        )  # fmt: skip
    else:
        written = build_program(  # the spec is handed over: no reference here keeps the source weights alive
            _llm_program(loaded, family, shape, config, hidden=hidden, architecture=facts.architecture),
            output,
            config,
            progress,
            quantized,
        )
    family.engine_tokenizer(loaded.tokenizer).save_pretrained(output / TOKENIZER_DIR)
    processor.save_pretrained(output / PROCESSOR_DIR)
    multimodal = MultimodalFacts(
        image_token_id=family.image_token_id(loaded.config),
        hidden_size=hidden,
        max_multimodal_len=mm_len,
        vision_batch_limit=limit,
        position_rows=family.position_rows,
        bidirectional_images=family.bidirectional_images,
        vision_compiled=vision_written.compiled,
        family_config=family.runtime_config(loaded.config),
    )
    engine = EngineFacts(
        config=config,
        model=facts,
        compiled=written.compiled,
        multimodal=multimodal,
        source_checkpoint=str(Path(checkpoint).resolve()),
        op_modules={**vision_written.op_modules, **written.op_modules},
        passes=written.passes,
        quantization=engine_quantization(config, quantized, written.quantized_layers),
        encoder_decoder=encoder_decoder,
        world=world,
    )
    write_engine_manifest(output, engine, device, progress)


def _llm_program(
    loaded: LoadedCheckpoint,
    family: VisionLanguageFamily,
    shape: CacheShape,
    config: BuildConfig,
    *,
    hidden: int,
    architecture: str,
) -> ProgramSpec:
    """The LLM program's spec, which takes the (vision-detached) model over from `loaded`."""
    spec = llm_spec(
        family.text_model(loaded.model),
        shape,
        hidden=hidden,
        position_rows=family.position_rows,
        bidirectional=family.bidirectional_images,
        dtype=torch_dtype(config.dtype),
        device=resolve_device(config.device),
        block_size=config.tokens_per_block,
        max_num_tokens=config.max_num_tokens,
        max_batch_size=config.max_batch_size,
        architecture=architecture,
    )
    del loaded.model  # only the spec holds the model now
    return spec
