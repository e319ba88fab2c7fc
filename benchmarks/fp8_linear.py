"""Time one-row linears on CUDA: kiln's bf16 Triton GEMV, its FP8 GEMV, and torch._scaled_mm at one row.

    PYTHONPATH=. python benchmarks/fp8_linear.py [--models 8b 1b] [--fused]

Shapes and timing as `benchmarks/quantized_linear.py` (a CUDA graph of back-to-back calls, each on
its own copy of the weight, >= 256 MB in all). Formats: bf16 (`linear_triton`); fp8, E4M3 per output
channel through `kiln.kernels.triton.fp8_gemv` (x kept in bf16); fp8blk, block-wise 128-column scales
through the same kernel; scaled_mm, x quantized per token then `torch._scaled_mm` (what W8A8 ran at
one row before the GEMV). GB/s counts the weight's bytes; "copy" is that over device-to-device copy
bandwidth. The summary adds up one decode step's projections (layers x the four, + lm_head in bf16):
issue 18's target is FP8 decode <= 3.0 ms per token for Llama-3.1-8B.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quantized_linear import DEVICE, DTYPE, SHAPES, copy_bandwidth, fusions, graph_time_us  # noqa: E402

from kiln.kernels.activation_quant import FP8, quantize_input  # noqa: E402
from kiln.kernels.triton.fp8_gemv import fp8_linear_gemv  # noqa: E402
from kiln.kernels.triton.gemv import linear_triton  # noqa: E402

FORMATS = ("bf16", "fp8", "fp8blk", "scaled_mm")


def weight(fmt: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if fmt == "bf16":
        return torch.empty(n, k, dtype=DTYPE, device=DEVICE).normal_(std=k**-0.5), torch.empty(0, device=DEVICE)
    values = torch.empty(n, k, device=DEVICE).normal_(std=64).clamp(-448, 448).to(FP8)
    groups = k // 128 if fmt == "fp8blk" else 1
    return values, torch.full((n, groups), 1 / (64 * k**0.5), device=DEVICE)


def call(fmt: str, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor], kw: dict[str, Any]) -> torch.Tensor:
    if fmt == "bf16":
        return linear_triton(x, w[0], None, constant_weight=True, **kw)
    if fmt == "scaled_mm":  # the W8A8 path's GEMM on an unfused call: quantize x, then the GEMM
        xq, xs = quantize_input(x, "dynamic", FP8, None)
        return torch._scaled_mm(xq, w[0].t(), xs, w[1].reshape(1, -1), out_dtype=x.dtype)
    return fp8_linear_gemv(x, w[0], w[1], constant_weight=True, **kw)


def error(fmt: str, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> float:
    dense = w[0].float() if fmt == "bf16" else w[0].float() * w[1].repeat_interleave(w[0].shape[1] // w[1].shape[1], 1)
    ref = x.float() @ dense.T
    return float((call(fmt, x, w, {}).float() - ref).abs().max() / (ref.abs().max() + 1e-6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["8b"], choices=sorted(SHAPES))
    parser.add_argument("--fused", action="store_true", help="each projection with its step's fusions")
    args = parser.parse_args()
    copy = copy_bandwidth()
    head_us: dict[str, float] = {}
    print(f"device-to-device copy: {copy / 1e9:.0f} GB/s")
    for model in args.models:
        layers, shapes = SHAPES[model]
        step = dict.fromkeys(FORMATS, 0.0)
        print(f"\n{model} | shape | " + " | ".join(f"{f} us (GB/s, copy, err)" for f in FORMATS))
        for name, k, n in shapes:
            x, kw = fusions(model, name, k, n) if args.fused else (torch.randn(1, k, dtype=DTYPE, device=DEVICE), {})
            cells = []
            for fmt in FORMATS:
                if fmt == "scaled_mm" and kw or name == "lm_head" and fmt != "bf16":
                    cells.append("-")
                    if name != "lm_head":
                        step.pop(fmt, None)  # not every projection timed: no step total
                    continue
                first = weight(fmt, n, k)
                size = first[0].numel() * first[0].element_size()
                ws = [first] + [weight(fmt, n, k) for _ in range(max(1, min(63, math.ceil(256e6 / size) - 1)))]
                us = graph_time_us([lambda w=w, f=fmt, x=x, kw=kw: call(f, x, w, kw) for w in ws])
                plain = x if x.shape[1] == k else torch.randn(1, k, dtype=DTYPE, device=DEVICE)
                err = error(fmt, plain, first)
                if fmt in step:
                    step[fmt] += us * (1 if name == "lm_head" else layers)
                if name == "lm_head":
                    head_us[model] = us
                cells.append(f"{us:.1f} ({size / us / 1e3:.0f}, {size / us / 1e3 / (copy / 1e9):.2f}, {err:.1e})")
                del ws
            print(f"{name} | {n}x{k} | " + " | ".join(cells))
        head = head_us.get(model, 0.0)  # the FP8 engines keep lm_head in bf16
        totals = [f"{f} {(step[f] + (head if f != 'bf16' else 0.0)) / 1000:.2f}" for f in FORMATS if f in step]
        print(f"{model} one decode step's projections, ms: " + ", ".join(totals))


if __name__ == "__main__":
    main()
