"""One rank's part of a model's quantized linears (FP8, SmoothQuant int8, a checkpoint's AWQ / GPTQ /
compressed-tensors weights), cut as the rank's dense slices are.

Column-parallel (a slice of output rows): the rows' values, scales and zero points; per-channel scales
follow their rows, a per-tensor scale is the same in every row; act-order (`perm`) orders the whole
input, which every rank reads, so it is kept. Row-parallel (a slice of input columns): the columns'
values, and the scale groups that lie inside them (a group may not straddle two ranks; a per-channel
scale covers the whole row and is kept); act-order is refused there. A static input scale is the same
on every rank. A dynamic per-token input scale is the absmax of the token's whole input row: a
row-parallel linear appends AMAX_COLUMNS columns holding that absmax over all ranks (their weights are
zero, `RowParallelLinear.amax_columns`), so each rank's per-token scale is the one-rank engine's."""

from __future__ import annotations

import dataclasses

import torch

from kiln.compiler.sharding.shard import Slice
from kiln.errors import KilnError
from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears

AMAX_COLUMNS = 16  # a multiple of 16 keeps a GPU GEMM's K aligned


def split_weight(name: str, weight: QuantizedWeight, piece: Slice) -> QuantizedWeight:
    """`weight`'s part for `piece` (rows: dim 0, input columns: dim 1), as described above."""
    start, stop = piece.start, piece.stop
    if piece.dim == 0:
        return dataclasses.replace(
            weight,
            values=weight.values[start:stop].contiguous(),
            scales=weight.scales[start:stop].contiguous(),
            zeros=None if weight.zeros is None else weight.zeros[start:stop].contiguous(),
        )
    if weight.perm is not None:
        raise KilnError(
            f"{name} is act-order (GPTQ desc_act, its columns permuted over the whole row): kiln cannot split it "
            "over tensor-parallel ranks; build this checkpoint with --tp-size 1, or use one quantized without act-order"
        )
    group = weight.group_size
    k = weight.values.shape[1]
    if group == k:  # per channel (or per tensor): the row's scale is the whole row's
        scales, zeros, group_size = weight.scales, weight.zeros, stop - start
    else:
        if start % group or stop % group:
            raise KilnError(
                f"{name}: quantization groups of {group} columns would straddle two ranks (each rank holds columns "
                f"{start}..{stop} of {k}): build with a --tp-size that gives each rank a multiple of {group} columns"
            )
        scales = weight.scales[:, start // group : stop // group].contiguous()
        zeros = None if weight.zeros is None else weight.zeros[:, start // group : stop // group].contiguous()
        group_size = group
    values = weight.values[:, start:stop]
    if weight.activations == "dynamic":
        if group != k:
            raise KilnError(f"{name}: per-token input scales with grouped weights cannot be split over ranks")
        values = torch.cat([values, values.new_zeros(values.shape[0], AMAX_COLUMNS)], dim=1)
        group_size = values.shape[1]
    return dataclasses.replace(weight, values=values.contiguous(), scales=scales, zeros=zeros, group_size=group_size)


def split_linears(quantized: QuantizedLinears, slices: dict[str, Slice]) -> QuantizedLinears:
    """This rank's QuantizedLinears: each weight split by its parameter's slice (whole where unsplit)."""
    weights = {}
    for name, weight in quantized.weights.items():
        piece = slices.get(name)
        weights[name] = weight if piece is None or piece.dim is None else split_weight(name, weight, piece)
    return dataclasses.replace(quantized, weights=weights)
