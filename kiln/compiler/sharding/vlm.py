"""`kiln build --tp-size N` of a vision-language checkpoint: the vision program is built once, unsharded
(rank 0 runs it; its image rows go to every rank with the step's inputs), and the language model is built
once per rank, sharded as a text model is. The dense checkpoint is loaded once (the vision side needs it
anyway); each rank's language model is cut from it (`in_memory.shard_in_memory`)."""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

from torch import nn

from kiln.compiler.capture_mm import llm_spec
from kiln.compiler.model_facts import resolve_device
from kiln.compiler.pipeline import WrittenProgram, build_program
from kiln.compiler.program_spec import CacheShape
from kiln.compiler.quantize.rtn import quantize_int8
from kiln.compiler.sharding.build import check_int4_groups, fake_world
from kiln.compiler.sharding.in_memory import shard_in_memory
from kiln.compiler.sharding.layout import check_tp, head_split
from kiln.compiler.sharding.plans import ShardPlan, plan_for
from kiln.config import BuildConfig, torch_dtype
from kiln.engine.manifest import WorldFacts
from kiln.errors import KilnError
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.progress import Progress


def check_sharded_vlm(config: BuildConfig, text: Any, architecture: str, quantized: bool, encdec: bool) -> None:
    """Refuse what a tensor-parallel vision-language build does not do."""
    if config.pp_size > 1 or encdec:
        raise KilnError("vision-language checkpoints shard with --tp-size only (no --pp-size, no encoder-decoder LM)")
    if quantized or config.quantization not in ("none", "int8_wo", "int4_wo"):
        raise KilnError(
            "a vision-language checkpoint is built with --tp-size > 1 unquantized, int8_wo or int4_wo (for now)"
        )
    plan_for(architecture)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    check_tp(config.tp_size, heads, kv_heads, getattr(text, "intermediate_size", None), architecture)
    check_int4_groups(config, text)


def whole_row_int8(model: nn.Module, plan: ShardPlan) -> QuantizedLinears:
    """int8_wo: the row-parallel linears quantized over whole rows before they are split, so each rank
    dequantizes the one-rank engine's weights (the pass quantizes the others per rank, row by row)."""
    rows = plan.attention_out + plan.mlp_out
    weights = {
        f"{name}.weight": quantize_int8(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in rows
    }
    return QuantizedLinears("int8_wo", 8, 0, weights)


def build_sharded_llm(
    model: nn.Module,
    text: Any,
    shape: CacheShape,
    config: BuildConfig,
    output: Any,
    progress: Progress,
    *,
    hidden: int,
    position_rows: int,
    bidirectional: bool,
    architecture: str,
) -> tuple[WrittenProgram, WorldFacts]:
    """Each rank's LLM program (rank{r}/) from `model`, the language model with its vision modules detached."""
    tp, dtype, device = config.tp_size, torch_dtype(config.dtype), resolve_device(config.device)
    plan = plan_for(architecture)
    written = []
    quantized = whole_row_int8(model, plan) if config.quantization == "int8_wo" else None
    kv_heads = head_split(0, tp, text.num_attention_heads, shape.num_kv_heads).kv_heads
    rank_shape = CacheShape(shape.num_layers, kv_heads, shape.head_dim)
    with fake_world(tp):
        for rank in range(tp):
            ranked, linears = shard_in_memory(model, plan, rank, tp, text, dtype, quantized)
            spec = llm_spec(
                ranked.to(device),
                rank_shape,
                hidden=hidden,
                position_rows=position_rows,
                bidirectional=bidirectional,
                dtype=dtype,
                device=device,
                block_size=config.tokens_per_block,
                max_num_tokens=config.max_num_tokens,
                max_batch_size=config.max_batch_size,
                architecture=architecture,
            )
            del ranked
            directory = WorldFacts.rank_dir(rank)
            written.append(
                build_program(dataclasses.replace(spec, directory=directory), output, config, progress, linears)
            )
            del spec
            gc.collect()
    progress.note(f"{architecture}: the language model over {tp} ranks ({kv_heads} KV heads each), vision on rank 0")
    return written[0], WorldFacts(tp_size=tp, kv_heads_per_rank=kv_heads)
