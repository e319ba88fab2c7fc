"""The host side the small-M linears share: dense `gemv.linear_triton`, quantized `qgemv.qlinear_gemv`
(both its kernels) and FP8 `fp8_gemv.fp8_linear_gemv`.

Each checks its fused prologue's and epilogue's inputs, makes its output (the whole answer when a
dimension is empty), splits K, counts its column tiles, passes the fusion's arguments (which every
kernel takes under the same names), launches with PDL where enabled and adds the split-K partial
sums in a last launch. Every choice comes from shapes, so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import triton

from kiln.kernels.triton.gemv_config import PROLOGUE_RMS_NORM, PROLOGUE_SILU_MUL, PROLOGUES
from kiln.kernels.triton.gemv_kernel import _sum_splits_kernel
from kiln.kernels.triton.pdl import launch_options

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # a launch configuration (GemvConfig, QGemvConfig)
Rope = tuple[torch.Tensor, torch.Tensor, int]  # (cos, sin, rope_width)
SUM_BLOCK = 1024


def prologue_width(x: torch.Tensor, prologue: str, norm_weight: torch.Tensor | None) -> tuple[int, int]:
    """(PROLOGUE_* code, K: the columns the product uses) after checking x and norm_weight against
    the prologue (silu_mul: x is [M, 2K] = [gate | up])."""
    k = x.shape[1]
    code = PROLOGUES[prologue]
    if code == PROLOGUE_SILU_MUL:
        assert k % 2 == 0 and x.stride(1) == 1, (tuple(x.shape), x.stride())
        k //= 2
    if code == PROLOGUE_RMS_NORM:
        assert norm_weight is not None and norm_weight.shape == (k,) and norm_weight.is_contiguous()
    return code, k


def check_bias_residual(x: torch.Tensor, n: int, bias: torch.Tensor | None, residual: torch.Tensor | None) -> None:
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    assert residual is None or (residual.shape == (x.shape[0], n) and residual.dtype == x.dtype)


def epilogue_config(
    config: C, m: int, n: int, k: int, residual: torch.Tensor | None, rope: Rope | None, gated: bool
) -> C:
    """The launch choice a rotary or gated epilogue needs (one row, two column tiles a program, no
    split K), after checking the epilogue's inputs; `config` as it is without one."""
    if rope is not None:
        cos, sin, rope_width = rope
        half = cos.shape[-1] // 2
        assert m == 1 and residual is None and k > 0, "rope is fused at one row without a residual"
        assert cos.shape == sin.shape == (m, 2 * half) and half > 0 and half & (half - 1) == 0, tuple(cos.shape)
        assert cos.stride(-1) == sin.stride(-1) == 1 and rope_width % (2 * half) == 0 and rope_width <= n
        config = replace(config, block_m=1, block_n=2, split_k=1)
    if gated:
        assert m == 1 and residual is None and rope is None and n % 2 == 0 and k > 0, "gated: one row, [gate | up]"
        config = replace(config, block_m=1, block_n=2, split_k=1)
    return config


def new_output(
    x: torch.Tensor,
    m: int,
    n: int,
    k: int,
    bias: torch.Tensor | None,
    gated: bool,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """(the [M, N] output in x's dtype ([M, N / 2] gated), whether it already holds the answer: an
    empty product needs no launch; with K = 0 that is the bias plus the residual)."""
    out = torch.empty(m, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out, True
    if k == 0:
        assert not gated, "a gated epilogue needs K > 0"
        out.zero_() if bias is None else out.copy_(bias.expand(m, n))
        return (out if residual is None else out.add_(residual)), True
    return out, False


def k_splits(length: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(splits, length of each: a multiple of block_k) for at most split_k splits of `length`, none empty."""
    split = min(split_k, triton.cdiv(length, block_k))
    per_split = triton.cdiv(triton.cdiv(length, split), block_k) * block_k
    return triton.cdiv(length, per_split), per_split


def split_target(out: torch.Tensor, split: int) -> torch.Tensor:
    """Where the kernel writes: out itself, or float32 [split, M, N] partial sums for `sum_splits`."""
    if split == 1:
        return out
    return torch.empty(split, out.shape[0], out.shape[1], dtype=torch.float32, device=out.device)


def column_tiles(n: int, block_n: int, rope: Rope | None, gated: bool) -> int:
    """Column tiles of `gemv_epilogue._tile_columns` (rope or gated: block_n is 2)."""
    if rope is not None:
        return rope[2] // 2 + triton.cdiv(n - rope[2], block_n)
    if gated:
        return n // 2
    return triton.cdiv(n, block_n)


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Fusion:
    """One call's fused prologue and epilogue, `linear_triton`'s meaning."""

    prologue: int  # PROLOGUE_* code
    norm_weight: torch.Tensor | None
    eps: float
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    rope: Rope | None
    gated: bool
    constant_weight: bool

    def kernel_args(self, placeholder: torch.Tensor, n: int, split: int, pdl: bool) -> dict[str, Any]:
        """The arguments the kernels take under these names (an absent tensor is `placeholder`)."""
        residual, rope = self.residual, self.rope
        return {
            "bias": self.bias if self.bias is not None else placeholder,
            "residual": residual if residual is not None else placeholder,
            "stride_rm": residual.stride(0) if residual is not None else 0,
            "stride_rn": residual.stride(1) if residual is not None else 0,
            "norm_w": self.norm_weight if self.norm_weight is not None else placeholder,
            "eps": self.eps,
            "cos": rope[0] if rope is not None else placeholder,
            "sin": rope[1] if rope is not None else placeholder,
            "stride_cm": rope[0].stride(0) if rope is not None else 0,
            "stride_sm": rope[1].stride(0) if rope is not None else 0,
            "rope_pairs": rope[2] // 2 if rope is not None else 0,
            "half_n": n // 2,
            "HAS_BIAS": self.bias is not None,
            "SPLIT": split,
            "PDL": pdl,
            "EARLY_W": pdl and self.constant_weight,
            "PROLOGUE": self.prologue,
            "RESIDUAL": residual is not None and split == 1,
            "ROPE": rope is not None,
            "HALF_D": rope[0].shape[-1] // 2 if rope is not None else 1,
            "GATED": self.gated,
        }


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    args: dict[str, Any],
    out: torch.Tensor,
    target: torch.Tensor,
    fusion: Fusion,
    pdl: bool,
    num_warps: int,
    num_stages: int = 1,
) -> torch.Tensor:
    """Launch `kernel` (arguments by name) writing `target`; then, for a split K, add the partial
    sums into out. Returns out."""
    kernel[grid](
        **args,
        num_warps=num_warps,
        num_stages=num_stages,
        # the rotary epilogue rounds each product and the sum as the reference does: no contraction
        # (see kiln.kernels.triton.rope); the product's own sums are then multiply-adds rounded apart
        enable_fp_fusion=fusion.rope is None,
        **launch_options(pdl),
    )
    if target is not out:
        sum_splits(target, out, fusion.bias, fusion.residual, pdl)
    return out


def sum_splits(
    target: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, pdl: bool
) -> None:
    """out = [residual +] the sum of a split-K launch's partial products (target: float32 [split, M, N])
    [+ bias], rounded once to out's dtype (the GEMV's and the quantized kernels' last launch)."""
    split, m, n = target.shape
    _sum_splits_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
        target,
        bias if bias is not None else out,
        out,
        residual if residual is not None else out,
        m,
        n,
        out.stride(0),
        out.stride(1),
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        HAS_BIAS=bias is not None,
        RESIDUAL=residual is not None,
        SPLIT=split,
        BLOCK=SUM_BLOCK,
        PDL=pdl,
        num_warps=4,
        **launch_options(pdl),
    )


__all__ = [
    "Fusion",
    "check_bias_residual",
    "column_tiles",
    "epilogue_config",
    "k_splits",
    "launch",
    "new_output",
    "prologue_width",
    "split_target",
    "sum_splits",
]
