"""Triton kernels: paged attention with one program per query token, split over key length.

Flash-decoding: programs are (token, kv head, split). Each split attends the token's group of
query heads to an equal share of its key range and leaves an unnormalised partial result with
its running max and sum; a second kernel merges the splits. The number of splits comes from
shapes only (tokens, kv heads, block-table width), so the launch is the same for every step
of a CUDA graph; each program derives its own key range from seq_lens on the device.

Every token finds its sequence by binary search on query_start_loc, so the kernels are correct
for any batch (several or zero new tokens per sequence, padding tokens) although they are meant
for decode, where each sequence has exactly one new token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from kiln.kernels.triton.decode_kernel import _decode_kernel
from kiln.kernels.triton.decode_merge import merge_splits
from kiln.kernels.triton.kv_codec import kernel_view, kind
from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.pdl import launch_options
from kiln.kernels.triton.tile import interpreting

MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64
PREFETCH_BYTES = 16 << 20  # at most this much of the next weight goes to L2 (of the H100's 50 MB)


@dataclass(frozen=True)
class DecodeConfig:
    """Keys per loop step and launch options of the split kernel."""

    block_n: int
    num_warps: int
    num_stages: int


def default_config(head_dim: int) -> DecodeConfig:
    return DecodeConfig(64 if head_dim <= 128 else 32, 4, 2)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 8  # the interpreter: any modest number


def choose_splits(num_tokens: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per (token, kv head), a power of two, from shapes only: enough programs to fill
    the GPU twice over, but no split shorter than MIN_KEYS_PER_SPLIT keys of the longest context."""
    target = 2 * _multiprocessors(device)
    splits = 1
    while (
        splits < MAX_SPLITS
        and num_tokens * num_kv_heads * splits < target
        and 2 * splits * MIN_KEYS_PER_SPLIT <= max_context
    ):
        splits *= 2
    return splits


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    prefetch: tuple[torch.Tensor, ...] = (),
    early_keys: bool = True,
    prefetch_bytes: int = PREFETCH_BYTES,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Attend each query token of q [T, Hq, D] to its cached keys; writes and returns out.

    With new_kv = (k, v, slot_mapping), this step's keys and values are not in the cache yet: the
    kernel attends to them from k/v and stores them at slot_mapping itself (what `write_kv` would
    do first), saving a kernel launch per layer. Every key it then reads from the cache was written
    by an earlier step, so under PDL each program loads its first key tile (block table, keys,
    values) before waiting for the kernel that computes q, k and v, taking those dependent loads
    off the step's critical path (`early_keys=False` waits first: a diagnostic).
    prefetch: constant weights read right after this call, in order (the output projection's, then
    the next one's). When the splits are merged by a second kernel, that kernel is launched early
    (PDL) and waits for this one while attention's chain of dependent loads leaves the memory bus
    idle; its programs first ask for up to `prefetch_bytes` of the weights (the first one first; at
    most two) to be brought into L2, so the projections start from cache (`prefetch_bytes=0`
    turns that off: a diagnostic).
    kv_scales: a narrow (FP8 / int8) cache's (k_scale, v_scale) for this layer (`kv_codec`).
    num_splits (a power of two) and config override the shape-based choices (tests, benchmarks)."""
    num_tokens, num_q_heads, head_dim = q.shape
    key_cache, value_cache = kv_cache[layer, 0], kv_cache[layer, 1]
    num_kv_heads, page_size = key_cache.shape[2], key_cache.shape[1]
    if num_tokens == 0:
        return out
    group = num_q_heads // num_kv_heads
    config = config or default_config(head_dim)
    block_n = config.block_n
    if num_splits is None:
        max_context = block_tables.shape[1] * page_size
        if sliding_window > 0:
            max_context = min(max_context, sliding_window + block_n)
        num_splits = choose_splits(num_tokens, num_kv_heads, max_context, q.device)
    assert num_splits > 0 and num_splits & (num_splits - 1) == 0, f"num_splits must be a power of two, got {num_splits}"
    if num_splits > 1:
        part_acc = torch.empty(num_tokens, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_tokens, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    pdl = pdl_enabled(q.device)
    k_new, v_new, slot_mapping = new_kv if new_kv is not None else (q, q, seq_lens)  # the latter unused
    _decode_kernel[(num_tokens, num_kv_heads, num_splits)](
        out,
        part_acc,
        part_m,
        part_l,
        q,
        kernel_view(key_cache),
        kernel_view(value_cache),
        block_tables,
        seq_lens,
        query_start_loc,
        k_new,
        v_new,
        slot_mapping,
        block_tables.shape[0],
        num_splits,
        *q.stride(),
        *out.stride(),
        block_tables.stride(0),
        *key_cache.stride(),
        *k_new.stride(),
        *v_new.stride(),
        scale,
        softcap,
        sliding_window,
        float(kv_scales[0]),
        float(kv_scales[1]),
        NUM_Q_HEADS=num_q_heads,
        SPLIT=num_splits > 1,
        FUSE_WRITE=new_kv is not None,
        EARLY=new_kv is not None and early_keys,
        GROUP=group,
        ROWS=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        SLIDING=sliding_window > 0,
        SOFTCAP=softcap > 0.0,
        IEEE_DOT=q.dtype == torch.float32,
        INTERPRET=interpreting(),
        KV=kind(key_cache.dtype),
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(pdl),
    )
    if num_splits > 1:
        merge_splits(out, part_acc, part_m, part_l, prefetch, prefetch_bytes, pdl)
    return out
