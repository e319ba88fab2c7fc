"""`kiln build --tp-size N`: each rank's program through the one build pipeline, in one process under
torch.distributed's fake backend (the functional collectives name the default group, which a torchrun
launch has too), each rank's weights streamed from the checkpoint's slices and freed before the next."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kiln.compiler.capture import text_spec
from kiln.compiler.model_facts import cache_shape, model_facts, resolve_device
from kiln.compiler.pipeline import EngineFacts, WrittenProgram, build_program, write_engine_manifest
from kiln.compiler.program_spec import CacheShape
from kiln.compiler.quantize.methods import engine_quantization, narrow_cache
from kiln.compiler.sharding.launched import BuildLaunch
from kiln.compiler.sharding.layout import check_tp, head_split
from kiln.compiler.sharding.stream import load_shard
from kiln.compiler.sharding.whole import WholeModel, needs_whole_model, sharded_kv_scales
from kiln.config import BuildConfig, torch_dtype
from kiln.engine.manifest import TOKENIZER_DIR, WorldFacts
from kiln.engine.world import WORLD_GROUP, make_groups
from kiln.errors import KilnError
from kiln.models.loader import load_config
from kiln.progress import Progress

SHARDED_METHODS = ("none", "int8_wo", "int4_wo", "int4_awq", "fp8", "int8_sq")


@contextlib.contextmanager
def fake_world(tp_size: int, pp_size: int = 1, rank: int = 0) -> Iterator[None]:
    """A one-process world of tp x pp ranks, seen from `rank`, whose collectives do nothing (for export
    and compile), with the groups a run makes (`kiln.engine.world.make_groups`)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise KilnError("a tensor-parallel build runs in one process: torch.distributed is already initialized here")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp_size * pp_size)
    make_groups(tp_size, pp_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_sharded_request(checkpoint: str | Path, config: BuildConfig) -> None:
    """Refuse a split that won't divide."""
    path = Path(checkpoint)
    if config.quantization not in SHARDED_METHODS:
        raise KilnError(
            f"--quantization {config.quantization} is built with --tp-size 1 only; {', '.join(SHARDED_METHODS[1:])} "
            "and pre-quantized checkpoints shard"
        )
    text = load_config(path).get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    check_tp(config.tp_size, heads, kv_heads, getattr(text, "intermediate_size", None), str(checkpoint))
    check_int4_groups(config, text)


def check_int4_groups(config: BuildConfig, text: Any) -> None:
    """int4_wo / int4_awq: each rank's slice of a row-parallel linear's columns holds whole groups."""
    if config.quantization not in ("int4_wo", "int4_awq"):
        return
    heads = text.num_attention_heads
    widths = {"MLP": getattr(text, "intermediate_size", 0), "attention": heads * cache_shape(text).head_dim}
    for what, width in widths.items():
        if (width // config.tp_size) % config.group_size:
            raise KilnError(
                f"int4 groups of {config.group_size} do not divide the {what} slice of {width // config.tp_size} "
                f"columns each of {config.tp_size} ranks holds: build with a smaller --group-size"
            )


def write_sharded_engine(checkpoint: str | Path, output: Path, config: BuildConfig, progress: Progress) -> None:
    check_sharded_request(checkpoint, config)
    device = resolve_device(config.device)
    dtype = torch_dtype(config.dtype)
    tp = config.tp_size
    written: list[WrittenProgram] = []
    launch = BuildLaunch.from_env(config)  # under torchrun: this process builds its own rank only
    whole = WholeModel(checkpoint, config, progress) if needs_whole_model(checkpoint, config) else None
    kv_scales = sharded_kv_scales(checkpoint, config, whole, progress)  # every rank's, the whole model's
    with fake_world(tp):
        for rank in range(tp) if launch is None else [launch.rank]:
            with progress.stage(f"load rank{rank}", f"slices of {checkpoint}"):
                if whole is not None:
                    loaded = whole.shard(rank, tp, WORLD_GROUP)
                else:
                    loaded = load_shard(checkpoint, dtype, rank, tp, int8=config.quantization == "int8_wo")
            if not written:
                shape = cache_shape(loaded.config)
                facts = model_facts(loaded, shape)
                config = config.resolved(facts.max_position_embeddings)
                split = head_split(0, tp, loaded.config.get_text_config().num_attention_heads, shape.num_kv_heads)
                rank_shape = CacheShape(shape.num_layers, split.kv_heads, shape.head_dim)
                progress.note(f"{facts.architecture}: {tp} ranks of {split.q_heads} heads, {split.kv_heads} KV heads")
            if rank == 0:
                loaded.tokenizer.save_pretrained(output / TOKENIZER_DIR)
            loaded.model.to(device)
            spec = text_spec(
                loaded.model,
                rank_shape,
                dtype=dtype,
                device=device,
                block_size=config.tokens_per_block,
                max_num_tokens=config.max_num_tokens,
                max_batch_size=config.max_batch_size,
                architecture=facts.architecture,
            )
            linears = loaded.quantized  # this rank's
            del loaded
            written.append(
                build_program(
                    dataclasses.replace(spec, directory=WorldFacts.rank_dir(rank)),
                    output,
                    config,
                    progress,
                    linears,
                    kv_scales,
                )
            )
            del spec
            gc.collect()
    quantized = None if whole is None else whole.quantized
    del whole
    if launch is not None:
        written = launch.finish_rank(output, written[0])
        if not launch.leads:
            return
    first = written[0]
    engine = EngineFacts(
        config=config,
        model=facts,
        compiled=first.compiled,
        source_checkpoint=str(Path(checkpoint).resolve()),
        op_modules=first.op_modules,
        passes=first.passes,
        quantization=engine_quantization(config, quantized, first.quantized_layers),
        world=WorldFacts(tp_size=tp, kv_heads_per_rank=rank_shape.num_kv_heads),
        kv_cache=narrow_cache(config, kv_scales),
    )
    write_engine_manifest(output, engine, device, progress)
    if device.type == "cuda":
        torch.cuda.empty_cache()
