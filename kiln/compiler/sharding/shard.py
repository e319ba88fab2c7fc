"""Turn a model whose parameters are on the meta device into one rank's shard: the split modules get
meta parameters of their slice's shape, and every parameter gets the checkpoint slice it is read from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.compiler.sharding.layout import HeadSplit, head_split, vocab_rows
from kiln.compiler.sharding.modules import RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from kiln.compiler.sharding.plans import ShardPlan
from kiln.engine.world import WORLD_GROUP


@dataclass(frozen=True)
class Slice:
    """Rows or columns [start, stop) of checkpoint tensor `key` along `dim` (None: the whole tensor),
    zero-padded to `size` along `dim`."""

    key: str
    dim: int | None = None
    start: int = 0
    stop: int = 0
    size: int = 0


def _meta(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def shard_model(
    model: nn.Module, plan: ShardPlan, rank: int, tp_size: int, text: Any, group: str = WORLD_GROUP
) -> dict[str, Slice]:
    """Split `model` in place for `rank` of `tp_size` (collectives over `group`); {parameter name: its slice}."""
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    split = head_split(rank, tp_size, heads, kv_heads)
    slices: dict[str, Slice] = {}
    for name, module in list(model.named_modules()):
        last = name.rpartition(".")[2]
        if isinstance(module, nn.Linear):
            span = _linear_span(last, plan, split, head_dim, module, rank, tp_size)
            if span is not None:
                row = last in plan.attention_out + plan.mlp_out
                slices.update(_split_linear(model, name, module, row, span, group))
        elif last == plan.attention and hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = split.q_heads // split.kv_heads
    vocab = text.vocab_size
    start, stop, rows = vocab_rows(rank, tp_size, vocab)
    embed = model.get_submodule(plan.embedding)
    head = model.get_submodule(plan.head)
    hidden = int(embed.get_parameter("weight").shape[1])
    embed_key = f"{plan.embedding}.weight"
    scale = getattr(embed, "embed_scale", None)
    scale = scale.clone() if isinstance(scale, torch.Tensor) else None
    _set(model, plan.embedding, VocabParallelEmbedding(torch.empty(rows, hidden, device="meta"), start, group, scale))
    slices[embed_key] = Slice(embed_key, 0, start, stop, rows)
    _set(model, plan.head, VocabParallelHead(torch.empty(rows, hidden, device="meta"), vocab, group))
    slices[f"{plan.head}.weight"] = Slice(f"{plan.head}.weight", 0, start, stop, rows)
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("a vocab-parallel head with a bias")
    for name, _ in model.named_parameters(remove_duplicate=False):
        slices.setdefault(name, Slice(name))
    return slices


def _linear_span(
    last: str, plan: ShardPlan, split: HeadSplit, head_dim: int, module: nn.Linear, rank: int, tp: int
) -> tuple[int, int] | None:
    """The [start, stop) this rank keeps of the linear's output rows (column-parallel) or input columns (row)."""
    if last in plan.query or last in plan.attention_out:
        return split.q_start * head_dim, (split.q_start + split.q_heads) * head_dim
    if last in plan.key_value:
        return split.kv_start * head_dim, (split.kv_start + split.kv_heads) * head_dim
    if last in plan.mlp_in:
        per = module.out_features // tp
        return rank * per, (rank + 1) * per
    if last in plan.mlp_out:
        per = module.in_features // tp
        return rank * per, (rank + 1) * per
    return None


def _split_linear(
    model: nn.Module, name: str, module: nn.Linear, row_parallel: bool, span: tuple[int, int], group: str
) -> dict[str, Slice]:
    start, stop = span
    width = stop - start
    weight, bias = f"{name}.weight", f"{name}.bias"
    if row_parallel:
        has_bias = module.bias is not None
        _set(
            model,
            name,
            RowParallelLinear(
                torch.empty(module.out_features, width, device="meta"),
                _meta(module.out_features) if has_bias else None,
                group,
            ),
        )
        return {weight: Slice(weight, 1, start, stop, width)}  # the bias is whole, added once after the sum
    module.weight = _meta(width, module.in_features)
    module.out_features = width
    out = {weight: Slice(weight, 0, start, stop, width)}
    if module.bias is not None:
        module.bias = _meta(width)
        out[bias] = Slice(bias, 0, start, stop, width)
    return out
