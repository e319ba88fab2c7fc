"""Triton kernel: a decode step's input ids, some of them taken from tokens sampled on the device.

A pipelined decode step is launched before the host has read the tokens the step before sampled;
those stay on the device. `take_sampled_` sets ids[i] = sampled[sources[i]] where sources[i] >= 0
and leaves the other ids as they are: one small kernel, which a decode graph runs first (instead of
an index_select and an index_copy launched before the graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _take_kernel(ids, sources, sampled, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    source = tl.load(sources + offs, mask=ok, other=-1)
    take = ok & (source >= 0)
    token = tl.load(sampled + tl.maximum(source, 0), mask=take, other=0)
    tl.store(ids + offs, token, mask=take)


def take_sampled_(ids: torch.Tensor, sources: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """ids[i] = sampled[sources[i]] where sources[i] >= 0, in place; 1-D int64 tensors, ids and
    sources of one length and contiguous. Returns ids."""
    assert ids.shape == sources.shape and ids.dim() == 1 and ids.is_contiguous() and sources.is_contiguous()
    assert ids.dtype == sources.dtype == sampled.dtype == torch.int64 and sampled.is_contiguous()
    n = ids.shape[0]
    if n:
        _take_kernel[(triton.cdiv(n, BLOCK),)](ids, sources, sampled, n, BLOCK=BLOCK, num_warps=4)
    return ids


__all__ = ["take_sampled_"]
