"""`kiln build --tp-size N / --pp-size M` of a vision-language checkpoint: the vision program is built once,
unsharded (rank 0 runs it: it is in the first stage, whose embeddings take the image rows; they go to the
first stage's other ranks with the step's inputs), and the language model is built once per rank, sharded
and cut into stages as a text model is. The dense checkpoint is loaded once (the vision side needs it
anyway); each rank's language model is cut from it (`in_memory.shard_in_memory`, `stage_cut.stage_copy`)."""

from __future__ import annotations

import contextlib
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
from kiln.compiler.sharding.launched import BuildLaunch
from kiln.compiler.sharding.layout import check_tp, head_split
from kiln.compiler.sharding.plans import PLANS, ShardPlan, plan_for
from kiln.compiler.sharding.stage_cut import body_path, keep_layers, stage_copy, stage_linears
from kiln.compiler.sharding.stages import stage_spec
from kiln.compiler.sharding.vlm_stages import first_stage_spec
from kiln.config import BuildConfig, torch_dtype
from kiln.engine.manifest import WorldFacts
from kiln.engine.world import tensor_group
from kiln.errors import KilnError, UnsupportedModelError
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.progress import Progress


def check_sharded_vlm(
    config: BuildConfig, text: Any, architecture: str, quantized: bool, encdec: bool, multimodal: tuple[int, bool]
) -> None:
    """Refuse what a tensor- or pipeline-parallel vision-language build does not do; `multimodal` is
    (position rows, bidirectional images) of the family."""
    if encdec:
        raise KilnError("vision-language checkpoints with an encoder-decoder language model are built with "
                        "--tp-size 1 and --pp-size 1 only")  # fmt: skip
    if quantized or config.quantization not in ("none", "int8_wo", "int4_wo"):
        raise KilnError(
            "a vision-language checkpoint is built with --tp-size or --pp-size > 1 unquantized, int8_wo or int4_wo "
            "(for now)"
        )
    if architecture not in PLANS:
        vlms = sorted(name for name in PLANS if "ConditionalGeneration" in name)
        raise UnsupportedModelError(
            f"{architecture}: kiln splits the language model of {', '.join(vlms)} over ranks, not this one's; "
            "build it with --tp-size 1 and --pp-size 1"
        )
    if config.pp_size > 1 and multimodal != (1, False):
        raise KilnError(
            f"{architecture} is built with --pp-size 1 only: its later stages would need its M-RoPE positions or "
            "image attention bounds (for now)"
        )
    layers = text.num_hidden_layers
    if layers % config.pp_size:
        raise KilnError(f"{layers} layers do not divide into {config.pp_size} pipeline stages")
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
    launch: BuildLaunch | None = None,
) -> tuple[list[WrittenProgram], WorldFacts]:
    """Each rank's LLM program (rank{r}/) from `model`, the language model with its vision modules detached:
    its tensor-parallel shard of its stage's layers (rank = stage x tp_size + tensor-parallel rank). Under
    torchrun (`launch`) this process's rank only."""
    tp, stages = config.tp_size, config.pp_size
    dtype, device = torch_dtype(config.dtype), resolve_device(config.device)
    plan, body = plan_for(architecture), body_path(architecture)
    written = []
    quantized = whole_row_int8(model, plan) if config.quantization == "int8_wo" else None
    kv_heads = head_split(0, tp, text.num_attention_heads, shape.num_kv_heads).kv_heads
    per = shape.num_layers // stages
    rank_shape = CacheShape(per, kv_heads, shape.head_dim)
    for rank in range(tp * stages) if launch is None else [launch.rank]:
        stage, t = divmod(rank, tp)
        start, stop, first, last = stage * per, (stage + 1) * per, stage == 0, stage == stages - 1
        with fake_world(tp, stages, rank) if tp > 1 else contextlib.nullcontext():
            if tp > 1:
                group = tensor_group(rank, tp, stages)
                ranked, linears = shard_in_memory(model, plan, t, tp, text, dtype, quantized, group)
                if stages > 1:
                    keep_layers(ranked, start, stop, first=first, last=last, body=body)
            else:
                ranked, linears = stage_copy(model, start, stop, first=first, last=last, body=body), quantized
            if stages > 1:
                linears = stage_linears(linears, start, stop, body)
            ranked.to(device)
            if stages == 1:
                spec = llm_spec(
                    ranked,
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
            elif first:
                spec = first_stage_spec(ranked, rank_shape, config, hidden, architecture)
            else:
                spec = stage_spec(ranked, rank_shape, config, hidden, architecture, stage=stage, stages=stages)
            del ranked
            directory = WorldFacts.rank_dir(rank)
            written.append(
                build_program(dataclasses.replace(spec, directory=directory), output, config, progress, linears)
            )
            del spec, linears
            gc.collect()
    progress.note(
        f"{architecture}: the language model over {tp} x {stages} ranks ({kv_heads} KV heads each), vision on rank 0"
    )
    world = WorldFacts(tp_size=tp, kv_heads_per_rank=kv_heads, pp_size=stages, hidden_size=hidden if stages > 1 else 0)
    return written, world
