"""int8 weight-only under tensor parallelism: a row-parallel linear's shard is quantized with the scale
of the whole row (the largest |w| over every rank's columns, read one rank's columns at a time), so each
rank dequantizes exactly the weights the one-rank engine does. Column-parallel linears keep whole rows and
int4 groups lie inside one rank's columns (the build checks it), so round-to-nearest in the pass is already
consistent for them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln.compiler.quantize.rtn import INT8_MAX
from kiln.compiler.sharding.shard import Slice
from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears

Reader = Callable[[Slice], torch.Tensor]  # a checkpoint slice, in the build's dtype


def row_parallel_int8(
    shards: dict[str, torch.Tensor], slices: dict[str, Slice], tp_size: int, read: Reader
) -> QuantizedLinears:
    """{name: this rank's int8 shard with whole-row scales} for the row-parallel weights in `shards`."""
    weights = {}
    for name, shard in shards.items():
        piece = slices[name]
        width = piece.stop - piece.start
        row_max = torch.zeros(shard.shape[0], 1)
        for rank in range(tp_size):  # the other ranks' columns, one slice at a time
            columns = read(Slice(piece.key, 1, rank * width, (rank + 1) * width, width))
            row_max = torch.maximum(row_max, columns.float().abs().amax(dim=1, keepdim=True))
        scales = row_max / INT8_MAX
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        values = torch.round(shard.float() / scales).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        weights[name] = QuantizedWeight(values, scales, None, bits=8, group_size=width)
    return QuantizedLinears(method="int8_wo", bits=8, group_size=0, weights=weights)
