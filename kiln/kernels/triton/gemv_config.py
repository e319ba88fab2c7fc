"""The small-M linear's launch choices (`GemvConfig`) from shapes and dtypes alone, and its prologue codes."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # rows of x per program: 1 or 2 on the CUDA cores, 16 with tl.dot
    block_n: int  # weight rows (output columns) per program
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    swap: bool = False  # tl.dot with the weight tile as the left operand
    tiles: int = 1  # column tiles (of block_n weight rows) per program, read one after another

    @property
    def dot(self) -> bool:
        return self.block_m >= 16


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a host query, no synchronisation); 132 off the GPU."""
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def fill_split(programs: int, length: int, block_k: int, steps: int, target: int) -> int:
    """K splits, a power of two: doubled while programs * splits stays below `target` and each split
    keeps at least `steps` tiles of block_k (of the `length` a weight row has)."""
    split = 1
    while programs * split < target and length // (split * 2) >= steps * block_k:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, sms: int = 132) -> GemvConfig:
    """The launch for an [m, k] x [n, k]^T product, from the shapes alone (H100 measurements).

    One row runs on the CUDA cores with 2-row x 2048 weight tiles and 8 warps: within 2% of the
    fastest of 30-60 configurations for every Llama-3.2-1B and Llama-3.1-8B projection, timed as
    back-to-back calls in a CUDA graph with programmatic dependent launch (`benchmarks/
    linear_kernels.py --sweep-one-row`; 0.63-1.04 of copy bandwidth, 3-10% faster than the
    earlier 4 x 1024 tiles). Narrower K gets a tile of its own width. More rows pad to 16 for tl.dot with a
    64-row weight tile on the left; K is split in powers of two (at least 4 tiles of K each) while
    the programs do not cover every SM, but only for K >= 4096: at K = 2048 splitting lost.
    """
    if m <= 1:
        return GemvConfig(1, 2, min(2048, max(64, triton.next_power_of_2(k))), 1, 8, 1)
    block_m, block_n, block_k = 16, 64, 128
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = fill_split(programs, k, block_k, 4, sms) if k >= 4096 else 1
    return GemvConfig(block_m, block_n, block_k, split, 4, 4, swap=True)


PROLOGUE_NONE = 0
PROLOGUE_SILU_MUL = 1  # x = [gate | up] (2K wide): silu(gate) * up, rounded as transformers rounds
PROLOGUE_RMS_NORM = 2  # x = rms_norm(x) * norm_weight (Llama's RMSNorm, rounded as transformers does)
PROLOGUES = {"none": PROLOGUE_NONE, "silu_mul": PROLOGUE_SILU_MUL, "rms_norm": PROLOGUE_RMS_NORM}


def prologue_config(prologue: int, m: int, n: int, k: int, sms: int = 132) -> GemvConfig:
    """`default_config`, adjusted at one row from a sweep of each Llama-3.2-1B and Llama-3.1-8B
    projection in its step (`benchmarks/step_skeleton.py --sweep`, H100):

    - a norm prologue: the row fits one tile (its statistics come from the tile itself), and each
      program takes two column tiles in turn, normalising x once for both (q/k/v: 108 -> 88 us per
      1B step, 610 -> 576 us per 8B step; gate/up 384 -> 368 us per 1B step);
    - no prologue, K <= 4096 (o_proj): 4 warps, one tile (1B 66 -> 64 us, 8B 394 -> 364 us);
    - no prologue, longer rows (down_proj): two column tiles (1B 192 -> 185 us; 8B within 1%);
    - the activation prologue: 4 weight rows share its 2K-wide input.
    More column tiles per program lost everywhere (4: up to 1.3x slower, 8: up to 2.4x)."""
    config = default_config(m, n, k, sms)
    if m > 1:
        return config
    if prologue == PROLOGUE_NONE:
        return replace(config, num_warps=4) if k <= 4096 else replace(config, tiles=2)
    if prologue == PROLOGUE_RMS_NORM:
        return replace(config, block_k=min(4096, max(64, triton.next_power_of_2(k))), tiles=2)
    if prologue == PROLOGUE_SILU_MUL:
        return replace(config, block_n=4)
    return config
