"""Triton kernel: store the step's new keys and values into the paged cache at `slot_mapping`.

One program per (token, chunk of Hkv * head_dim elements); a token whose slot is negative
writes nothing. The slot is read on the device, so the launch needs no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    HEAD_DIM: tl.constexpr,
    NUM_ELEMENTS: tl.constexpr,  # Hkv * HEAD_DIM
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
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
    tl.store(key_cache + dst, key.to(key_cache.dtype.element_ty), mask=mask)
    tl.store(value_cache + dst, value.to(value_cache.dtype.element_ty), mask=mask)


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton version of `kiln.kernels.reference.write_kv` (same arguments, same effect)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    key_cache, value_cache = kv_cache[layer, 0], kv_cache[layer, 1]
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
        HEAD_DIM=head_dim,
        NUM_ELEMENTS=num_elements,
        PAGE_SIZE=key_cache.shape[1],
        BLOCK=block,
        PDL=pdl,
        num_warps=4,
        **launch_options(pdl),
    )
