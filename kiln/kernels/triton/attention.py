"""The Triton implementation of `kiln::paged_attention`: write the new keys/values, then attend.

Every choice here is made from shapes and dtypes alone, never from tensor values, so a call
needs no host synchronisation and can be captured in a CUDA graph. A narrow (FP8 / int8) cache is
stored and read with the layer's scales, plain float arguments (`kv_codec`). When every sequence could
have exactly one new token (T == B) the split-K decode kernels run, and the decode kernel stores
the new keys and values itself; otherwise the KV write, then the tiled prefill kernel, which is correct for any mix of
prefill, chunked prefill and decode rows. Both paths are correct for any batch; the choice only
affects speed.
"""

from __future__ import annotations

import torch

from kiln.kernels.triton.decode import decode_attention
from kiln.kernels.triton.kv_codec import FP8, PLAIN, kind
from kiln.kernels.triton.kv_write import write_kv
from kiln.kernels.triton.prefill import prefill_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None when they can."""
    head_dim = q.shape[-1]
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        return f"head_dim must be a power of two in [16, 256], got {head_dim}"
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        return "q, k and v must share head_dim"
    if q.dtype not in SUPPORTED_DTYPES or (kv_cache.dtype != q.dtype and kind(kv_cache.dtype) == PLAIN):
        return (
            f"q ({q.dtype}) and kv_cache ({kv_cache.dtype}) must share a dtype among fp16/bf16/fp32, "
            "or the cache be float8_e4m3fn / int8"
        )
    if kind(kv_cache.dtype) == FP8 and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        return "an FP8 KV cache needs a GPU of compute capability 8.9 or newer (Ada, Hopper)"
    if q.shape[1] % k.shape[1]:
        return f"num_q_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({k.shape[1]})"
    return None


def paged_attention_triton(
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
    prefetch: tuple[torch.Tensor, ...] = (),
    attend_end: torch.Tensor | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Same contract as `kiln.kernels.reference.paged_attention`, on the device, without host syncs;
    prefetch: constant weights the decode kernels pull into L2 (see `decode.decode_attention`).

    attend_end [T] (per-query key bound) goes to the prefill kernel; the decode path ignores it: with
    one new token per sequence every key a query may see is at or before it, so its bound is p + 1.
    kv_scales: (k_scale, v_scale) of this layer's narrow (FP8 / int8) cache (`kv_codec`)."""
    reason = unsupported_reason(q, k, v, kv_cache)
    assert reason is None, f"the Triton paged attention cannot run this call: {reason}"
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    args = (q, kv_cache, block_tables, seq_lens, query_start_loc, layer, scale, sliding_window, softcap, out)
    if q.shape[0] == block_tables.shape[0]:
        # stores the new keys itself
        return decode_attention(*args, new_kv=(k, v, slot_mapping), prefetch=prefetch, kv_scales=kv_scales)
    write_kv(kv_cache, layer, k, v, slot_mapping, *kv_scales)
    return prefill_attention(*args, attend_end=attend_end, kv_scales=kv_scales)
