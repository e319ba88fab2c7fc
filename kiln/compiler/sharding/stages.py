"""`kiln build --pp-size N`: the model's layers split into N consecutive stages, one program per stage
(per rank of a stage, with --tp-size: each stage's ranks shard it as a tensor-parallel build does).
Stage 0 maps token ids to hidden states through its layers; each later stage maps the hidden states it
receives through its own; the last one ends with the norm and the head and returns logits. Each stage's
attention layers are numbered from 0 in its own KV cache."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.compiler.capture import INPUT_NAMES, causal_lm_logits, dynamic_shapes, example_inputs, mixed_step_inputs
from kiln.compiler.model_facts import cache_shape, model_facts, resolve_device
from kiln.compiler.pipeline import EngineFacts, WrittenProgram, build_program, write_engine_manifest
from kiln.compiler.program_spec import CacheShape, ProgramSpec
from kiln.compiler.quantize.methods import engine_quantization, narrow_cache
from kiln.compiler.sharding.build import check_sharded_request, fake_world
from kiln.compiler.sharding.launched import BuildLaunch
from kiln.compiler.sharding.layout import head_split
from kiln.compiler.sharding.stage_cut import (
    body_path,
    checkpoint_layer_name,
    keep_layers,
    stage_copy,
    stage_linears,
)
from kiln.compiler.sharding.stream import load_shard
from kiln.compiler.sharding.whole import WholeModel, needs_whole_model, sharded_kv_scales
from kiln.config import BuildConfig, torch_dtype
from kiln.engine.manifest import TOKENIZER_DIR, WorldFacts
from kiln.engine.world import tensor_group
from kiln.errors import KilnError
from kiln.models.loader import LoadedCheckpoint, load_checkpoint
from kiln.progress import Progress

PIPELINED_METHODS = ("none", "int8_wo", "int4_wo", "int4_awq", "fp8", "int8_sq")  # the last three: quantized whole
STAGE_INPUT_NAMES = ("hidden_states", *INPUT_NAMES[1:])  # a later stage takes hidden states [T, hidden]


class PipelineStage(nn.Module):
    """One stage of the unmodified model (its layers only), behind the packed-token signature."""

    def __init__(self, model: nn.Module, first: bool, last: bool) -> None:
        super().__init__()
        self.model: Any = model
        self.first, self.last = first, last
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(
        self,
        tokens_or_hidden: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        logits_indices: torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        given = {"input_ids": tokens_or_hidden[None]} if self.first else {"inputs_embeds": tokens_or_hidden[None]}
        if not self.last:
            return self.model.model(**given, position_ids=positions[None], use_cache=False).last_hidden_state[0]
        return causal_lm_logits(self.model, self._keeps_logits, given, positions, logits_indices)


def stage_spec(
    model: nn.Module, shape: CacheShape, config: BuildConfig, hidden: int, architecture: str, *, stage: int, stages: int
) -> ProgramSpec:
    dtype, device = torch_dtype(config.dtype), resolve_device(config.device)
    first, last = stage == 0, stage == stages - 1
    args = example_inputs(shape, dtype, device, config.tokens_per_block)
    check = mixed_step_inputs(shape, dtype, device, config.tokens_per_block)
    if not first:
        gen = torch.Generator().manual_seed(stage)
        args = (torch.randn(args[0].shape[0], hidden, generator=gen).to(dtype).to(device), *args[1:])
        check = (torch.randn(check[0].shape[0], hidden, generator=gen).to(dtype).to(device), *check[1:])
    return ProgramSpec(
        module=PipelineStage(model, first, last).eval(),
        args=args,
        dynamic_shapes=dynamic_shapes(max(config.max_num_tokens, 9), max(config.max_batch_size, 2)),
        what=f"{architecture} stage {stage}",
        architecture=architecture,
        input_names=INPUT_NAMES if first else STAGE_INPUT_NAMES,
        check_inputs=check,
        cache=shape,
    )


def stages_written(written: list[WrittenProgram], tp_size: int = 1, layers_per_stage: int = 0) -> WrittenProgram:
    """What the manifest records of the ranks' programs, in rank order: every rank's op modules, the
    quantized layers of all stages named with the checkpoint's layer numbers (rank r holds stage
    r // tp_size, whose layers start at stage x layers_per_stage), the last stage's passes (its head is
    the one every pass sees)."""
    layers = (
        checkpoint_layer_name(name, rank // tp_size * layers_per_stage)
        for rank, w in enumerate(written)
        for name in w.quantized_layers
    )
    return WrittenProgram(
        compiled=written[0].compiled,
        op_modules={op: mods for w in written for op, mods in w.op_modules.items()},
        passes=written[-1].passes,
        quantized_layers=tuple(dict.fromkeys(layers)),
    )


def check_pipeline_request(checkpoint: str | Path, config: BuildConfig) -> None:
    if config.quantization not in PIPELINED_METHODS:
        raise KilnError(
            f"--quantization {config.quantization} is built with --pp-size 1 only; pipeline stages are built "
            f"unquantized, {', '.join(PIPELINED_METHODS[1:])} or from a pre-quantized checkpoint (for now)"
        )
    if config.tp_size > 1:
        check_sharded_request(checkpoint, config)


def _load_rank(
    checkpoint: str | Path, config: BuildConfig, whole: WholeModel | None, rank: int, progress: Progress
) -> LoadedCheckpoint:
    """Rank `rank`'s model, whole or its tensor-parallel slices (a model quantized whole is shared, not copied)."""
    tp, stages = config.tp_size, config.pp_size
    with progress.stage(f"load rank{rank}", str(checkpoint)):
        if whole is not None:
            if tp > 1:
                return whole.shard(rank % tp, tp, tensor_group(rank, tp, stages))
            return dataclasses.replace(whole.loaded, quantized=whole.quantized)  # the model is shared
        if tp > 1:
            group = tensor_group(rank, tp, stages)
            return load_shard(
                checkpoint, torch_dtype(config.dtype), rank % tp, tp, int8=config.quantization == "int8_wo", group=group
            )
        return load_checkpoint(
            checkpoint,
            torch_dtype(config.dtype),
            resolve_device(config.device),
            trust_remote_code=config.trust_remote_code,
        )


def write_pipeline_engine(checkpoint: str | Path, output: Path, config: BuildConfig, progress: Progress) -> None:
    """Each rank's stage loaded (its tensor-parallel slices with --tp-size), cut to its layers and built in
    turn: rank = stage x tp_size + tensor-parallel rank. FP8, SmoothQuant and pre-quantized checkpoints are
    quantized whole first, as a one-rank build does; each stage takes its layers' quantized linears."""
    check_pipeline_request(checkpoint, config)
    stages, tp = config.pp_size, config.tp_size
    device = resolve_device(config.device)
    launch = BuildLaunch.from_env(config)  # under torchrun: this process builds its own rank only
    whole = WholeModel(checkpoint, config, progress) if needs_whole_model(checkpoint, config) else None
    kv_scales = sharded_kv_scales(checkpoint, config, whole, progress)  # the whole model's; each stage takes its own
    written: list[WrittenProgram] = []
    for rank in range(stages * tp) if launch is None else [launch.rank]:
        stage, t = divmod(rank, tp)
        with fake_world(tp, stages, rank) if tp > 1 else contextlib.nullcontext():
            loaded = _load_rank(checkpoint, config, whole, rank, progress)
            shape = cache_shape(loaded.config)
            text = loaded.config.get_text_config()
            if shape.num_layers % stages:
                raise KilnError(f"{shape.num_layers} layers do not divide into {stages} pipeline stages")
            per = shape.num_layers // stages
            kv_heads = head_split(t, tp, text.num_attention_heads, shape.num_kv_heads).kv_heads
            if not written:
                facts = model_facts(loaded, shape)
                config = config.resolved(facts.max_position_embeddings)
            if rank == 0:
                loaded.tokenizer.save_pretrained(output / TOKENIZER_DIR)
            hidden = int(text.hidden_size)
            body = body_path(facts.architecture)
            start, stop, first, last = stage * per, (stage + 1) * per, stage == 0, stage == stages - 1
            quantized = stage_linears(loaded.quantized, start, stop, body)  # this stage's layers, renumbered
            if whole is not None and tp == 1:  # the model quantized whole is shared: cut a copy
                model = stage_copy(loaded.model, start, stop, first=first, last=last, body=body)
            else:
                model = loaded.model
                keep_layers(model, start, stop, first=first, last=last, body=body)
            del loaded
            model.to(device)
            gc.collect()
            rank_shape = CacheShape(per, kv_heads, shape.head_dim)
            spec = stage_spec(model, rank_shape, config, hidden, facts.architecture, stage=stage, stages=stages)
            del model
            directory = WorldFacts.rank_dir(rank)
            written.append(
                build_program(
                    dataclasses.replace(spec, directory=directory),
                    output,
                    config,
                    progress,
                    quantized,
                    None if kv_scales is None else kv_scales[start:stop],
                )
            )
            del spec, quantized
            gc.collect()
    whole_linears = None if whole is None else whole.quantized
    del whole
    if launch is not None:
        written = launch.finish_rank(output, written[0])
        if not launch.leads:
            return
    merged = stages_written(written, tp, per)
    engine = EngineFacts(
        config=config,
        model=facts,
        compiled=merged.compiled,
        source_checkpoint=str(Path(checkpoint).resolve()),
        op_modules=merged.op_modules,
        passes=merged.passes,
        quantization=engine_quantization(config, whole_linears, merged.quantized_layers),
        world=WorldFacts(tp_size=tp, kv_heads_per_rank=kv_heads, pp_size=stages, hidden_size=hidden),
        kv_cache=narrow_cache(config, kv_scales),
    )
    write_engine_manifest(output, engine, device, progress)
