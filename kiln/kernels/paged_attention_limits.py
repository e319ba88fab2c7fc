"""`kiln::paged_attention_limits`: paged attention whose causal bound is given per query.

Query i attends to keys at positions < attend_end[i] (and inside its sliding window, if any).
Text tokens pass position + 1, which is plain causal attention; the image tokens of a Gemma 3
prompt pass the end of their image, so each image's tokens see each other bidirectionally. Every
key a query may see must be in the cache or among the step's new tokens: the scheduler never
splits such an image across prefill chunks.

On CUDA it takes the Triton kernels when `kiln.kernels.paged_attention.use_triton` allows (the
prefill kernel reads attend_end on the device, so no call synchronises with the host); on CPU, as
`kiln::paged_attention` there (`use_cpu_path`); elsewhere the PyTorch reference.
"""

from __future__ import annotations

import torch

from kiln.kernels import cpu_attention, reference
from kiln.kernels.paged_attention import use_cpu_path, use_triton


@torch.library.custom_op("kiln::paged_attention_limits", mutates_args=("kv_cache",))
def paged_attention_limits(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    attend_end: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    if use_triton(q):
        from kiln.kernels.triton import paged_attention_triton, unsupported_reason

        if unsupported_reason(q, k, v, kv_cache) is None:
            args = (q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, layer, scale)
            return paged_attention_triton(*args, sliding_window, softcap, attend_end=attend_end)
    attend = cpu_attention.paged_attention if use_cpu_path(q) else reference.paged_attention
    return attend(
        q,
        k,
        v,
        kv_cache,
        slot_mapping,
        block_tables,
        seq_lens,
        query_start_loc,
        layer,
        scale,
        sliding_window,
        softcap,
        attend_end=attend_end,
    )


@paged_attention_limits.register_fake
def _paged_attention_limits_fake(  # type: ignore[no-untyped-def]
    q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, attend_end, layer, scale, window, softcap
):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])
