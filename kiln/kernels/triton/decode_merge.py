"""The merge of decode's splits, whose programs first ask for the next weights to be brought into L2."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton.pdl import handoff, launch_options
from kiln.kernels.triton.tile import interpreting


@triton.jit
def _prefetch_to_l2(  # type: ignore[no-untyped-def]
    first_weight, first_lines, second_weight, lines, program, programs, LINE: tl.constexpr, BLOCK: tl.constexpr
):
    """Program `program` of `programs` asks for its share of `lines` cache lines (LINE elements
    each: the first `first_lines` of first_weight, then second_weight's) to be brought into L2
    (`prefetch.global.L2`: nothing is returned or waited for, so the program moves on at once)."""
    per = tl.cdiv(lines, programs)
    end = tl.minimum((program + 1) * per, lines)
    offs = tl.arange(0, BLOCK)
    for begin in range(program * per, end, BLOCK):
        line = tl.minimum(begin + offs, end - 1).to(tl.int64)
        in_first = line < first_lines
        address = tl.where(in_first, first_weight + line * LINE, second_weight + (line - first_lines) * LINE)
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [address], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _merge_kernel(  # type: ignore[no-untyped-def]
    out,
    part_acc,
    part_m,
    part_l,
    prefetch,  # PREFETCH: constant weights whose first cache lines go to L2: prefetch_first of this one,
    prefetch_second,  # then this one's, prefetch_lines in all
    prefetch_first,
    prefetch_lines,
    stride_ot,
    stride_oh,
    stride_od,
    NUM_Q_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREFETCH: tl.constexpr,
    LINE: tl.constexpr,  # elements of `prefetch` per 128-byte line
    PDL: tl.constexpr,  # launched with programmatic dependent launch
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if PREFETCH:  # before the wait: launched early, these programs would otherwise idle while decode runs
        _prefetch_to_l2(
            prefetch, prefetch_first, prefetch_second, prefetch_lines,
            token * NUM_Q_HEADS + head, tl.num_programs(0) * NUM_Q_HEADS, LINE, 512,
        )  # fmt: skip
    handoff(PDL)
    splits = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    part = (token * NUM_Q_HEADS + head).to(tl.int64) * NUM_SPLITS + splits
    m = tl.load(part_m + part)
    l_part = tl.load(part_l + part)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_max)  # 0 for empty splits
    total = tl.sum(l_part * weight, 0)
    acc = tl.load(part_acc + part[:, None] * HEAD_DIM + offs_d[None, :])
    result = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out + token * stride_ot + head * stride_oh + offs_d * stride_od, result.to(out.dtype.element_ty))


def prefetch_lines(sizes: list[int], budget: int) -> tuple[int, int]:
    """(lines of the first weight, lines in all): whole 128-byte lines of weights of `sizes` bytes, in
    order, the first one first, at most two weights and `budget` bytes."""
    first = min(sizes[0], budget) // 128 if sizes else 0
    second = min(sizes[1] // 128, budget // 128 - first) if len(sizes) > 1 else 0
    return first, first + second


def merge_splits(
    out: torch.Tensor,
    part_acc: torch.Tensor,
    part_m: torch.Tensor,
    part_l: torch.Tensor,
    prefetch: tuple[torch.Tensor, ...],
    prefetch_bytes: int,
    pdl: bool,
) -> None:
    """Write into out [T, Hq, D] the splits' partial results part_acc [T, Hq, splits, D] (with their
    maxima and sums part_m, part_l) merged; `prefetch`, `prefetch_bytes`: see `decode_attention`."""
    num_tokens, num_q_heads, num_splits, head_dim = part_acc.shape
    weights = [w for w in prefetch[:2] if w.is_cuda and w.is_contiguous() and w.dtype == out.dtype]
    if interpreting() or len(weights) != len(prefetch[:2]):
        weights = []
    line = 128 // out.element_size()
    first_lines, lines = prefetch_lines([w.numel() * w.element_size() for w in weights], prefetch_bytes)
    _merge_kernel[(num_tokens, num_q_heads)](
        out,
        part_acc,
        part_m,
        part_l,
        weights[0] if weights else out,
        weights[-1] if weights else out,
        first_lines,
        lines,
        *out.stride(),
        NUM_Q_HEADS=num_q_heads,
        NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim,
        PREFETCH=lines > 0,
        LINE=max(line, 1),
        PDL=pdl,
        num_warps=4,
        **launch_options(pdl),
    )
