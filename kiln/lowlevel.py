"""Low-level engine building for models kiln has no recipe for (in the manner of Ditto's API).

    build_llm_engine(language_model, "engines/my-vlm", tokenizer=tok, image_token_id=32000,
                     max_prompt_embedding_table_size=2304)
    build_multimodal_engine(vision_wrapper, "engines/my-vlm", input_specs=[InputSpec(shape=(-1, 3, 336, 336))])

The language model is a transformers model whose attention goes through the attention interface and
that takes `inputs_embeds` and `position_ids`; its engine gets the prompt-embedding table inputs. The
vision wrapper maps a batch of image tensors (dimension 0 dynamic) to features `[batch, tokens, hidden]`.
Requests then give token ids (or text) with the image token once per image and each image as the
wrapper's input tensors: `LLM(dir).generate([{"prompt": ids, "images": [tensor]}])`.

Both builders work on a copy of the module they are given: the caller's module keeps its device,
dtype and attention implementation (so it can still serve as the reference to check the engine).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.compiler.capture_mm import llm_spec, vision_spec
from kiln.compiler.model_facts import cache_shape, model_facts, resolve_device
from kiln.compiler.pipeline import EngineFacts, build_program, write_engine_manifest
from kiln.config import BuildConfig, torch_dtype
from kiln.engine.manifest import PROCESSOR_DIR, TOKENIZER_DIR, MultimodalFacts, read_manifest, write_manifest
from kiln.errors import KilnError
from kiln.models.attention_interface import register_attention
from kiln.models.loader import ATTENTION_NAME, LoadedCheckpoint
from kiln.models.registry import ModelRecipe
from kiln.models.vlm import CUSTOM_ARCHITECTURE
from kiln.progress import Progress


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """One vision-program input: its shape with -1 for the dynamic batch dimension (dim 0), and dtype."""

    shape: tuple[int, ...]
    dtype: str | None = None  # None: the engine's dtype

    def __post_init__(self) -> None:
        if not self.shape or self.shape[0] != -1 or any(d < 1 for d in self.shape[1:]):
            raise KilnError(f"InputSpec.shape must be (-1, positive sizes...) with a dynamic batch first: {self.shape}")


def _working_copy(module: nn.Module, name: str) -> nn.Module:
    """A deep copy to build from, so that the caller's module keeps its device, dtype and attention."""
    try:
        return copy.deepcopy(module)
    except Exception as exc:
        raise KilnError(
            f"{name} ({type(module).__name__}) cannot be copied for the build ({type(exc).__name__}: {exc}); "
            "the builders work on a copy so that your module stays as it was: keep objects that cannot be "
            "deep-copied (locks, open files, clients) out of the module's attributes"
        ) from exc


def build_llm_engine(
    language_model: nn.Module,
    output: str | Path,
    *,
    tokenizer: Any,
    image_token_id: int,
    max_prompt_embedding_table_size: int,
    progress: bool = False,
    **options: Any,
) -> Path:
    """The LLM program of a vision-language engine, with its prompt-embedding table inputs.

    `options` are BuildConfig fields (dtype, device, max_batch_size, max_seq_len, compile...).
    """
    config = BuildConfig.from_dict({**options, "max_multimodal_len": max_prompt_embedding_table_size})
    report = Progress(enabled=progress)
    device, dtype = resolve_device(config.device), torch_dtype(config.dtype)
    output = Path(output)
    register_attention()
    model: Any = _working_copy(language_model, "language_model")
    model.set_attn_implementation(ATTENTION_NAME)
    model.to(device=device, dtype=dtype).eval()
    shape = cache_shape(model.config)
    recipe = ModelRecipe(architecture=CUSTOM_ARCHITECTURE, kind="vision_language")
    loaded = LoadedCheckpoint(model, model.config, tokenizer, recipe, getattr(model, "generation_config", None))
    facts = model_facts(loaded, shape)
    config = config.resolved(facts.max_position_embeddings)
    hidden = int(model.config.get_text_config().hidden_size)
    spec = llm_spec(
        model,
        shape,
        hidden=hidden,
        position_rows=1,
        bidirectional=False,
        dtype=dtype,
        device=device,
        block_size=config.tokens_per_block,
        max_num_tokens=config.max_num_tokens,
        max_batch_size=config.max_batch_size,
        architecture=type(model).__name__,
    )
    output.mkdir(parents=True, exist_ok=True)
    written = build_program(spec, output, config, report)
    tokenizer.save_pretrained(output / TOKENIZER_DIR)
    tokenizer.save_pretrained(output / PROCESSOR_DIR)
    mm = MultimodalFacts(
        image_token_id=int(image_token_id),
        hidden_size=hidden,
        max_multimodal_len=max_prompt_embedding_table_size,
        vision_batch_limit=0,
        position_rows=1,
        bidirectional_images=False,
        vision_compiled=False,
        family_config={"image_token_id": int(image_token_id)},
    )
    engine = EngineFacts(
        config=config,
        model=facts,
        compiled=written.compiled,
        multimodal=mm,
        op_modules=written.op_modules,
        passes=written.passes,
    )
    write_engine_manifest(output, engine, device, report)
    return output


def build_multimodal_engine(
    vision_module: nn.Module,
    output: str | Path,
    *,
    input_specs: Sequence[InputSpec],
    max_batch_size: int | None = None,
    compile: bool = True,
    progress: bool = False,
) -> Path:
    """The vision program of an engine whose LLM program `build_llm_engine` wrote into `output`.

    The batch dimension is dynamic up to `max_batch_size` (default: the LLM's max_prompt_embedding_table_size
    divided by the features per image).
    """
    output = Path(output)
    manifest = read_manifest(output)
    mm = manifest.multimodal
    if mm is None or manifest.model.architecture != CUSTOM_ARCHITECTURE:
        raise KilnError(f"{output} holds no LLM engine from build_llm_engine: build that first")
    if not input_specs:
        raise KilnError("build_multimodal_engine needs at least one InputSpec")
    device, dtype = resolve_device(manifest.device["type"]), torch_dtype(manifest.build.dtype)
    vision_module = _working_copy(vision_module, "vision_module").to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)
    args = tuple(
        torch.randn(2, *spec.shape[1:], generator=gen).to(device, torch_dtype(spec.dtype) if spec.dtype else dtype)
        for spec in input_specs
    )
    with torch.no_grad():
        features = vision_module(*args)
    if features.dim() != 3 or features.shape[0] != 2 or features.shape[2] != mm.hidden_size:
        raise KilnError(
            f"the vision module must return [batch, tokens, {mm.hidden_size}] (the language model's hidden size); "
            f"it returned {tuple(features.shape)}"
        )
    per_image = int(features.shape[1])
    limit = max_batch_size or max(1, mm.max_multimodal_len // per_image)
    batch = torch.export.Dim("images", min=1, max=max(limit, 2))
    spec = vision_spec(vision_module, args, tuple({0: batch} for _ in args), type(vision_module).__name__)
    config = dataclasses.replace(manifest.build, compile=compile)
    written = build_program(spec, output, config, Progress(enabled=progress))
    mm = dataclasses.replace(
        mm,
        vision_batch_limit=limit,
        vision_compiled=written.compiled,
        family_config={**mm.family_config, "tokens_per_image": per_image},
    )
    op_modules = {**manifest.op_modules, **written.op_modules}
    write_manifest(output, dataclasses.replace(manifest, multimodal=mm, op_modules=op_modules))
    return output
