"""Launch choices of the quantized few-row linear (`QGemvConfig`), from shapes and bits alone."""

from __future__ import annotations

from dataclasses import dataclass

import triton

from kiln.kernels.triton.gemv_config import fill_split

MAX_GEMV_ROWS = 4  # x rows a program holds
TILE_BYTES = 4096  # packed weight bytes a program reads per step


@dataclass(frozen=True)
class QGemvConfig:
    block_m: int  # rows of x per program: 1, 2 or 4 (CUDA cores)
    block_n: int  # weight rows (output columns) per program
    block_k: int  # packed bytes per weight row and step (int4: columns j.. and K/2 + j.. at once)
    split_k: int
    num_warps: int
    gather: bool = False  # read scales per element even where a tile is whole groups (for sweeps)


def default_qconfig(bits: int, m: int, n: int, k: int, sms: int = 132) -> QGemvConfig:
    """4 weight rows by 1024 bytes per step on 4 warps: each thread holds 8 bytes of each row, and
    its 8 x values (one 16-byte load) serve all 4 rows; a step's x tile then has the weight tile's
    layout, with no shared-memory shuffle between them (checked in the sm_90 compile). Fewer bytes
    per row for more x rows. K split in powers of two while the programs do not fill the SMs twice
    and each split keeps 4 steps. Not yet timed on a GPU: `benchmarks/quantized_linear.py --sweep`."""
    block_m = min(MAX_GEMV_ROWS, triton.next_power_of_2(max(m, 1)))
    row_bytes = k // 2 if bits == 4 else k
    block_n = 4
    block_k = min(TILE_BYTES // (block_n * block_m), max(16, triton.next_power_of_2(max(row_bytes, 1))))
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = fill_split(programs, row_bytes, block_k, 4, 2 * sms)
    return QGemvConfig(block_m, block_n, block_k, split, 4)
