"""Sharded layers whose forward calls functional collectives, which torch.export keeps in the graph
and Inductor compiles: a row-parallel linear all-reduces its partial sums, a vocab-parallel embedding
all-reduces its masked lookups, a vocab-parallel head all-gathers its logits."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.nn import functional as F

# The group each collective runs over, by name (kiln.engine.world): a build under the fake backend and a
# torchrun launch make the same groups in the same order.


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_slice @ W[:, slice].T) + bias: each rank holds a slice of the input columns.
    With `amax_columns` (a W8A8 weight quantizing its input per token), the slice is followed by that many
    columns holding each token's absmax over all ranks, whose weight columns are zero: the per-token
    scale a rank computes is then the whole row's (`kiln.compiler.sharding.split_quantized`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group: Any = group
        self.amax_columns = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amax_columns:
            amax = funcol.all_reduce(x.abs().amax(dim=-1, keepdim=True), "max", self.group)
            x = torch.cat([x, amax.expand(*x.shape[:-1], self.amax_columns)], dim=-1)
        y = funcol.all_reduce(F.linear(x, self.weight), "sum", self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the table; ids outside them look up zeros, and the ranks' sum is the
    lookup, times `embed_scale` where the model's embedding scales its rows (Gemma)."""

    def __init__(self, weight: torch.Tensor, start: int, group: str, embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start
        self.group: Any = group
        self.embed_scale: torch.Tensor | None
        self.register_buffer("embed_scale", embed_scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        rows = rows * inside.unsqueeze(-1).to(rows.dtype)
        rows = funcol.all_reduce(rows, "sum", self.group)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary rows, gathered over the ranks and cut to the vocabulary."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, group: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_size = vocab_size
        self.group: Any = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = funcol.all_gather_tensor(F.linear(x, self.weight), x.dim() - 1, self.group)
        return logits[..., : self.vocab_size]
