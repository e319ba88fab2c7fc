"""`kiln::paged_attention`: KV write plus attention over packed sequences through block tables.

One op covers prefill, chunked prefill (queries attend to cached keys plus their own) and decode,
for grouped/multi-query heads, sliding windows (> 0) and logit soft-capping (> 0). The layout is
described in `kiln.kernels.reference`. It mutates `kv_cache` in place, which torch.export records
and Inductor keeps as an in-place call.

On CUDA tensors the op runs the Triton kernels of `kiln.kernels.triton` (no host
synchronisation, so it can sit inside CUDA graphs) when triton is importable and the
kernel selection's `attention` is not `reference` (`kiln.kernels.selection`); on CPU tensors, unless the
selection's `attention` is `reference`, `kiln.kernels.cpu_attention` (decode rows batched through SDPA);
everywhere else, and for inputs the Triton kernels do not take (see
`kiln.kernels.triton.unsupported_reason`), the PyTorch reference.
"""

from __future__ import annotations

import torch

from kiln.kernels import cpu_attention, reference
from kiln.kernels.selection import current
from kiln.kernels.triton_support import triton_importable


def use_triton(q: torch.Tensor) -> bool:
    """Whether the op takes the Triton path for a call whose query is q (its device, the kernel selection)."""
    return q.is_cuda and current().attention != "reference" and triton_importable()


def use_cpu_path(q: torch.Tensor) -> bool:
    """Whether the op takes `kiln.kernels.cpu_attention` for a call whose query is q."""
    return q.device.type == "cpu" and current().attention != "reference"


@torch.library.custom_op("kiln::paged_attention", mutates_args=("kv_cache",))
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    prefetch: torch.Tensor | None = None,
    prefetch_next: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """prefetch, prefetch_next: constant weights read right after this op (the output projection's,
    then the next projection's): on the decode kernels' path, spare programs pull their first bytes
    into the L2 cache while attention's dependent loads leave the memory bus idle (a hint: values
    never change). k_scale, v_scale: this layer's scales of a narrow (FP8 / int8) cache
    (`kiln.kernels.kv_quant`), which every path (Triton, CPU, reference) stores and reads alike."""
    if use_triton(q):
        from kiln.kernels.triton import paged_attention_triton, unsupported_reason

        if unsupported_reason(q, k, v, kv_cache) is None:
            return paged_attention_triton(
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
                tuple(w for w in (prefetch, prefetch_next) if w is not None),
                kv_scales=(k_scale, v_scale),
            )
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
        k_scale=k_scale,
        v_scale=v_scale,
    )


@paged_attention.register_fake
def _paged_attention_fake(  # type: ignore[no-untyped-def]
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
    prefetch=None,
    prefetch_next=None,
    k_scale=1.0,
    v_scale=1.0,
):
    # Same shape and (contiguous) strides as the real implementation's output.
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])
