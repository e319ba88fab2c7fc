"""Triton kernels: `x @ W.T (+ bias)` for a few rows of x and a packed int8 / int4 weight W.

A decode step reads every weight once for a token row, so it is bound by the bytes read: int8
halves them and int4 g128 makes them ~0.28 of bf16's. One row goes to `qgemv_row_kernel` (the
default: rows of whole words, groups of whole 8-column runs), built so that a byte costs about
two instructions (its `prmt` and its product) with no shared-memory traffic in the loop; the
older `qgemv_kernel` takes explicit launch configurations, 2..4 rows a program (slower per row:
the dispatch sends those to `qgemm`) and weights the row kernel does not take. Both dequantize
with `dequantize_packed`'s formula (`kiln.kernels.quantized_weight`) in float32 and accumulate
in float32, with the dense kernel's prologues and epilogues (`kiln.kernels.triton.gemv.linear_triton`'s meaning).
Act-order weights (perm): the caller gathers x into the stored column order first (quantized_dispatch).
Every launch choice comes from shapes, so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

from kiln.kernels.quantized_weight import bits_of
from kiln.kernels.triton.gemv_config import fill_split, num_sms
from kiln.kernels.triton.gemv_launch import (
    Fusion,
    Rope,
    check_bias_residual,
    column_tiles,
    epilogue_config,
    k_splits,
    launch,
    new_output,
    prologue_width,
    split_target,
)
from kiln.kernels.triton.pdl import enabled as pdl_enabled
from kiln.kernels.triton.qgemv_config import QGemvConfig, default_qconfig
from kiln.kernels.triton.qgemv_dequant import GROUP_GATHER, GROUP_SPLIT, group_mode
from kiln.kernels.triton.qgemv_kernel import _qlinear_kernel
from kiln.kernels.triton.qgemv_row_kernel import BYTE_MAGIC, NIBBLE_MAGIC, _qrow_kernel

MAGIC = 0x4B000000  # float32 2**23's bits (`qgemv_dequant`)
CHUNK = 8  # columns a thread of the one-row kernel holds in a weight row (`qgemv_kernel._step`)
# True: the one-row kernel turns bytes into floats with PTX `prmt` (one instruction a byte); False:
# with shifts and masks (three), the code the interpreter tests run. Off until the prmt path has
# passed tests/kernels/test_quantized_kernels.py on a GPU (`bash scripts/device_quant.sh tests`).
USE_PRMT = False
# The one-row kernel's tile (`qgemv_row_kernel`): weight rows a program, words a thread holds of each row.
# 8 rows: its loop compiles (sm_90) to 5.1 instructions a weight for int4 g128 and 3.9 for int8 against
# 5.6 and 7.0 at 4 rows, since x's conversion and prologue serve twice the weights
# (`benchmarks/kernel_sass.py`); not yet timed on a GPU.
ROW_BLOCK_N = 8
ROW_WORDS = 2


def check_packed(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, k: int
) -> int:
    """The weight's bits, after checking the packed tensors against in_features k."""
    bits = bits_of(qweight)
    n = qweight.shape[0]
    assert qweight.dim() == 2 and qweight.stride(1) == 1, (tuple(qweight.shape), qweight.stride())
    assert qweight.shape[1] == (k // 2 if bits == 4 else k) and (bits == 8 or k % 2 == 0), (tuple(qweight.shape), k)
    assert group_size > 0 and k % group_size == 0 and scales.shape == (n, k // group_size), tuple(scales.shape)
    assert scales.stride(1) == 1 and (zeros is None or (zeros.shape == scales.shape and zeros.stride(1) == 1))
    return bits


def qlinear_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: QGemvConfig | None = None,
    constant_weight: bool = False,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    rope: Rope | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """[residual +] prologue(x) [M, K] @ W[N, K]^T + bias -> a new [M, N] in x's dtype, for the packed
    W = (qweight, scales, zeros, group_size) of `kiln.kernels.quantized_weight` (no perm).

    prologue / residual / rope / gated / constant_weight: as `linear_triton` (rope and gated at one
    row). M should be small (the accumulator holds up to 4 rows per program): more rows belong to
    `kiln.kernels.triton.qgemm.qlinear_gemm`."""
    m = x.shape[0]
    code, k = prologue_width(x, prologue, norm_weight)
    bits = check_packed(qweight, scales, zeros, group_size, k)
    n = qweight.shape[0]
    row_bytes = qweight.shape[1]
    check_bias_residual(x, n, bias, residual)
    fusion = Fusion(code, norm_weight, eps, bias, residual, rope, gated, constant_weight)
    if config is None and row_kernel_takes(qweight, zeros, group_size, bits, m, k):
        epilogue_config(default_qconfig(bits, m, n, k), m, n, k, residual, rope, gated)  # checks the epilogue
        return _row_linear(x, qweight, scales, zeros, group_size, bits, fusion)
    config = config or default_qconfig(bits, m, n, k, num_sms(x.device))
    config = epilogue_config(config, m, n, k, residual, rope, gated)
    out, done = new_output(x, m, n, k, bias, gated, residual)
    if done:
        return out
    block_k = config.block_k
    split, per_split = k_splits(row_bytes, block_k, config.split_k)
    mode = group_mode(block_k, row_bytes, group_size, config.gather)
    chunked = (
        config.block_m == 1
        and mode != GROUP_GATHER
        and group_size % CHUNK == 0
        and block_k % CHUNK == 0
        and row_bytes % 4 == 0
        and qweight.data_ptr() % 4 == 0
    )
    target = split_target(out, split)
    grid = (column_tiles(n, config.block_n, rope, gated), triton.cdiv(m, config.block_m), split)
    pdl = pdl_enabled(x.device)
    wbytes = qweight.view(torch.uint8)
    args = fusion.kernel_args(scales, n, split, pdl) | {
        "x": x,
        "w": wbytes,
        "scales": scales,
        "zeros": zeros if zeros is not None else scales,
        "out": target,
        "M": m,
        "N": n,
        "K": k,
        "KB": row_bytes,
        "stride_xm": x.stride(0),
        "stride_xk": x.stride(1),
        "stride_wn": wbytes.stride(0),
        "stride_sn": scales.stride(0),
        "stride_zn": zeros.stride(0) if zeros is not None else 0,
        "stride_om": target.stride(-2),
        "stride_on": target.stride(-1),
        "stride_os": target.stride(0) if split > 1 else 0,
        "magic": MAGIC,
        "KB_PER_SPLIT": per_split,
        "K_PAD": triton.cdiv(k, 256) * 256,
        "BITS": bits,
        "GROUP": group_size,
        "MODE": mode,
        "GPT": block_k // group_size if mode == GROUP_SPLIT else 1,
        "HAS_ZEROS": zeros is not None,
        "CHUNKED": chunked,
        "CHUNK": CHUNK,
        "ASM": USE_PRMT and not triton.knobs.runtime.interpret,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": block_k,
        "EVEN_N": n % config.block_n == 0 and rope is None,
        "EVEN_K": row_bytes == split * per_split,
    }
    return launch(_qlinear_kernel, grid, args, out, target, fusion, pdl, config.num_warps)


def row_kernel_takes(
    qweight: torch.Tensor, zeros: torch.Tensor | None, group_size: int, bits: int, m: int, k: int
) -> bool:
    """Whether one row goes to `qgemv_row_kernel` (the default): rows of whole 4-byte words on a
    16-byte aligned weight, groups of whole 8-column runs (int4: K/2 too)."""
    row_bytes = qweight.shape[1]
    return (
        m == 1
        and k > 0
        and qweight.shape[0] > 0
        and group_size % (4 * ROW_WORDS) == 0
        and row_bytes % (4 * ROW_WORDS if bits == 4 else 4) == 0
        and qweight.stride(0) % 4 == 0
        and qweight.data_ptr() % 16 == 0
    )


def _row_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bits: int,
    fusion: Fusion,
) -> torch.Tensor:
    """One row through `_qrow_kernel`: ROW_BLOCK_N weight rows (half as many column pairs) a program, 1 KB of each row a
    step (8 bytes a thread), K split in powers of two while the programs do not fill the SMs twice and
    each split keeps 2 steps (`fill_split`; not with rope or gated pairs)."""
    n, row_bytes = qweight.shape
    k = row_bytes * (2 if bits == 4 else 1)
    rope, gated = fusion.rope, fusion.gated
    block_n = ROW_BLOCK_N
    block_k = min(512 * ROW_WORDS, max(8 * ROW_WORDS, triton.next_power_of_2(row_bytes)))
    if rope is not None:
        pairs = rope[2] // 2 + triton.cdiv(n - rope[2], 2)
        programs, even_n = triton.cdiv(pairs, block_n // 2), (n - rope[2]) % 2 == 0 and pairs % (block_n // 2) == 0
    elif gated:
        pairs = n // 2
        programs, even_n = triton.cdiv(pairs, block_n // 2), pairs % (block_n // 2) == 0
    else:
        programs, even_n = triton.cdiv(n, block_n), n % block_n == 0
    if rope is not None or gated:
        split = 1
    else:
        split = fill_split(programs, row_bytes, block_k, 2, 2 * num_sms(x.device))
    split, per_split = k_splits(row_bytes, block_k, split)
    out = torch.empty(1, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    target = split_target(out, split)
    pdl = pdl_enabled(x.device)
    args = fusion.kernel_args(scales, n, split, pdl)
    del args["stride_rm"], args["stride_cm"], args["stride_sm"]  # one row: x, the residual and cos/sin are vectors
    args |= {
        "x": x,
        "w": qweight.view(torch.uint8).view(torch.int32),
        "scales": scales,
        "zeros": zeros if zeros is not None else scales,
        "out": target,
        "N": n,
        "K": k,
        "KB": row_bytes,
        "stride_xk": x.stride(1),
        "stride_wn": qweight.stride(0) // 4,
        "stride_sn": scales.stride(0),
        "stride_zn": zeros.stride(0) if zeros is not None else 0,
        "stride_on": target.stride(-1),
        "stride_os": target.stride(0) if split > 1 else 0,
        "magic": NIBBLE_MAGIC if bits == 4 else BYTE_MAGIC,
        "KB_PER_SPLIT": per_split,
        "K_PAD": triton.cdiv(k, 256) * 256,
        "BITS": bits,
        "GROUP": group_size,
        "HAS_ZEROS": zeros is not None,
        "PER_ROW": scales.shape[1] == 1 and zeros is None,
        "ASM": USE_PRMT and not triton.knobs.runtime.interpret,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "EVEN_N": even_n,
        "EVEN_K": row_bytes == split * per_split,
        "WPT": ROW_WORDS,
    }
    num_warps = max(1, min(4, block_k // (128 * ROW_WORDS)))
    return launch(_qrow_kernel, (programs, 1, split), args, out, target, fusion, pdl, num_warps)


__all__ = ["QGemvConfig", "default_qconfig", "qlinear_gemv", "row_kernel_takes"]
