"""Triton kernel: store the step's new keys and values into the paged cache at `slot_mapping`.

One program per (token, chunk of Hkv * head_dim elements); a token whose slot is negative
writes nothing. A narrow (FP8 / int8) cache stores value / scale rounded (`kv_codec`). The slot
is read on the device, so the launch needs no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton.kv_codec import encode, kernel_view, kind
from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import handoff, launch_options


@triton.jit
def _kv_write_kernel(  # type: ignore[no-untyped-def]
    key_cache,
    value_cache,
    k,
    v,
    slot_mapping,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_page,
    stride_slot,
    stride_head,
    stride_dim,
    k_scale,
    v_scale,
    HEAD_DIM: tl.constexpr,
    NUM_ELEMENTS: tl.constexpr,  # Hkv * HEAD_DIM
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    KV: tl.constexpr,  # kv_codec.PLAIN / FP8 / INT8
    PDL: tl.constexpr,  # launched with programmatic dependent launch
):
    handoff(PDL)
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    mask = (offs < NUM_ELEMENTS) & (slot >= 0)
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    dst = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_slot + head * stride_head + dim * stride_dim
    key = tl.load(k + token * stride_kt + head * stride_kh + dim * stride_kd, mask=mask)
    value = tl.load(v + token * stride_vt + head * stride_vh + dim * stride_vd, mask=mask)
    tl.store(key_cache + dst, encode(key, k_scale, key_cache, KV), mask=mask)
    tl.store(value_cache + dst, encode(value, v_scale, value_cache, KV), mask=mask)


def write_kv(
    kv_cache: torch.Tensor,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Triton version of `kiln.kernels.reference.write_kv` (same arguments, same effect; a narrow
    cache stores values / scale rounded, `kv_codec`)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    kind_of_cache = kind(kv_cache.dtype)
    key_cache, value_cache = kernel_view(kv_cache[layer, 0]), kernel_view(kv_cache[layer, 1])
    num_elements = num_kv_heads * head_dim
    block = min(triton.next_power_of_2(num_elements), 2048)
    grid = (num_tokens, triton.cdiv(num_elements, block))
    pdl = pdl_enabled(k.device)
    _kv_write_kernel[grid](
        key_cache,
        value_cache,
        k,
        v,
        slot_mapping,
        *k.stride(),
        *v.stride(),
        *key_cache.stride(),
        float(k_scale),
        float(v_scale),
        HEAD_DIM=head_dim,
        NUM_ELEMENTS=num_elements,
        PAGE_SIZE=key_cache.shape[1],
        BLOCK=block,
        KV=kind_of_cache,
        PDL=pdl,
        num_warps=4,
        **launch_options(pdl),
    )
