"""One rank's shard of a model already in memory: for what a build must see whole before it shards (a
vision-language checkpoint, FP8 / SmoothQuant calibration, a pre-quantized checkpoint's linears). The rank's
model is a copy of the model whose parameters are its slices, and its quantized linears are cut to match."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from kiln.compiler.sharding.modules import RowParallelLinear
from kiln.compiler.sharding.plans import ShardPlan
from kiln.compiler.sharding.shard import shard_model
from kiln.compiler.sharding.split_quantized import AMAX_COLUMNS, split_linears
from kiln.compiler.sharding.stream import cut, fill
from kiln.engine.world import WORLD_GROUP
from kiln.models.quantized_checkpoint import QuantizedLinears


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (its buffers are copied)."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False) for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def shard_in_memory(
    model: nn.Module,
    plan: ShardPlan,
    rank: int,
    tp_size: int,
    text: Any,
    dtype: torch.dtype,
    quantized: QuantizedLinears | None = None,
    group: str = WORLD_GROUP,
) -> tuple[nn.Module, QuantizedLinears | None]:
    """(rank `rank`'s model, its quantized linears); `model` is left as it is."""
    full = dict(model.named_parameters(remove_duplicate=False))
    ranked = meta_copy(model)
    slices = shard_model(ranked, plan, rank, tp_size, text, group)
    mine = None if quantized is None else split_linears(quantized, slices)
    for name, weight in (mine.weights if mine is not None else {}).items():
        owner = ranked.get_submodule(name.rpartition(".")[0]) if name in slices else None
        if isinstance(owner, RowParallelLinear) and weight.activations == "dynamic":
            owner.amax_columns = AMAX_COLUMNS  # its dense weight gets the zero columns too
            slices[name] = dataclasses.replace(slices[name], size=slices[name].size + AMAX_COLUMNS)
    fill(ranked, slices, lambda _, piece: cut(full[piece.key], piece, dtype))
    return ranked, mine
