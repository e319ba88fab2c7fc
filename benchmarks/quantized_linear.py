"""Time one-row linears on CUDA: kiln's bf16 Triton GEMV against its int8 and int4 kernels.

    PYTHONPATH=. python benchmarks/quantized_linear.py [--models 8b 1b] [--fused] [--sweep]

Shapes are Llama-3.1-8B's and Llama-3.2-1B's projections as kiln runs them (qkv and gate_up
fused) and lm_head. Formats: bf16 (`kiln.kernels.triton.gemv.linear_triton`), int8 per output
channel and int4 with groups of 128 and zero points (`kiln.kernels.triton.qgemv.qlinear_gemv`).
Each timing replays a CUDA graph of back-to-back calls, each on its own copy of the weight (at
least 256 MB in all, so the weights come from HBM, not L2); the time per call is the median
graph time over the call count. GB/s counts the bytes of the weight as stored (int4: packed
bytes + scales + zeros); "copy" is that rate over the measured device-to-device copy bandwidth.
The summary adds up one decode step's projections (layers x the four, + lm_head) per format, the
number to set against issue 17's targets (8B: bf16 5.2 ms/token, int8 <= 3.0, int4 g128 <= 2.0).

--prmt turns bytes into floats with PTX prmt instead of shifts and masks (`qgemv.USE_PRMT`).
--fused times each projection with the step's fusions (qkv: rms_norm + rope; o: residual;
gate_up: rms_norm + gated; down: silu_mul + residual). --sweep also times a grid of one-row
launch configurations per shape (rows, bytes per step, warps, scales gathered per element or
spread by groups) and prints the fastest beside the default: ~13 compiles per shape, a few
minutes with --models 8b alone.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import triton

from kiln.kernels.quantized_weight import dequantize_packed
from kiln.kernels.triton import qgemv
from kiln.kernels.triton.gemv import linear_triton, num_sms
from kiln.kernels.triton.qgemm import qlinear_gemm
from kiln.kernels.triton.qgemv import qlinear_gemv
from kiln.kernels.triton.qgemv_config import QGemvConfig, default_qconfig

# name, K, N, layers-per-step multiplier key
SHAPES: dict[str, tuple[int, list[tuple[str, int, int]]]] = {
    "8b": (
        32,
        [
            ("qkv", 4096, 6144),
            ("o", 4096, 4096),
            ("gate_up", 4096, 28672),
            ("down", 14336, 4096),
            ("lm_head", 4096, 128256),
        ],
    ),
    "1b": (
        16,
        [
            ("qkv", 2048, 3072),
            ("o", 2048, 2048),
            ("gate_up", 2048, 16384),
            ("down", 8192, 2048),
            ("lm_head", 2048, 128256),
        ],
    ),
}
HEAD_DIM = {"8b": 128, "1b": 64}
ROPE_HEADS = {"8b": 40, "1b": 40}  # query + key heads of qkv (32 + 8)
DEVICE = "cuda"
DTYPE = torch.bfloat16
FORMATS = ("bf16", "int8", "int4g128")
# (weight rows, bytes per step, warps, gather): 8 bytes a thread and row (the x tile's layout), then others
SWEEP = [(bn, 256 * w, w, False) for bn in (2, 4, 8) for w in (2, 4, 8)] + [
    (4, 512, 4, False),
    (8, 512, 4, False),
    (4, 2048, 4, False),
    (4, 1024, 4, True),
]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=DTYPE, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def graph_time_us(calls: list[Callable[[], object]]) -> float:
    """Median time per call of a CUDA graph that runs `calls` back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = triton.testing.do_bench(graph.replay, warmup=3, rep=30, return_mode="median")
    del graph
    return float(ms) * 1000 / len(calls)


def weight(fmt: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """(weight or qweight, scales, zeros, group size) of random values."""
    if fmt == "bf16":
        return torch.empty(n, k, dtype=DTYPE, device=DEVICE).normal_(std=k**-0.5), None, None, 0
    if fmt.startswith("int8"):
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEVICE)
        return q, torch.full((n, 1), 1 / (64 * k**0.5), dtype=DTYPE, device=DEVICE), None, k
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    scales = (torch.rand(n, k // 128, device=DEVICE) / (4 * k**0.5)).to(DTYPE)
    zeros = torch.randint(0, 16, (n, k // 128), device=DEVICE).to(DTYPE)
    return q, scales, zeros, 128


def nbytes(w: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]) -> int:
    return sum(t.numel() * t.element_size() for t in w[:3] if t is not None)


def fusions(model: str, name: str, k: int, n: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """x and the keyword arguments of the step's fused call for this projection."""
    x = torch.randn(1, k, dtype=DTYPE, device=DEVICE)
    norm = torch.ones(k, dtype=DTYPE, device=DEVICE)
    if name == "qkv":
        head = HEAD_DIM[model]
        cos, sin = torch.rand(2, 1, head, device=DEVICE).to(DTYPE)
        rope = (cos.contiguous(), sin.contiguous(), ROPE_HEADS[model] * head)
        return x, {"prologue": "rms_norm", "norm_weight": norm, "eps": 1e-5, "rope": rope}
    if name == "gate_up":
        return x, {"prologue": "rms_norm", "norm_weight": norm, "eps": 1e-5, "gated": True}
    residual = torch.randn(1, n, dtype=DTYPE, device=DEVICE)
    if name == "down":
        return torch.randn(1, 2 * k, dtype=DTYPE, device=DEVICE), {"prologue": "silu_mul", "residual": residual}
    if name == "o":
        return x, {"residual": residual}
    return x, {}


def call(fmt: str, x: torch.Tensor, w: tuple, kw: dict[str, Any], config: QGemvConfig | None = None) -> torch.Tensor:
    if fmt == "bf16":
        return linear_triton(x, w[0], None, constant_weight=True, **kw)
    if fmt.endswith("-gemm"):  # the many-row tl.dot kernel at this row count (no fusions)
        return qlinear_gemm(x, w[0], w[1], w[2], w[3], None)
    return qlinear_gemv(x, w[0], w[1], w[2], w[3], None, config, constant_weight=True, **kw)


def error(fmt: str, x: torch.Tensor, w: tuple) -> float:
    dense = w[0] if fmt == "bf16" else dequantize_packed(w[0], w[1], w[2], None, w[3], torch.float32)
    ref = x.float() @ dense.float().T
    return float((call(fmt, x, w, {}).float() - ref).abs().max() / (ref.abs().max() + 1e-6))


def time_format(
    fmt: str, x: torch.Tensor, n: int, k: int, kw: dict[str, Any]
) -> tuple[float, int, float, list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]]]:
    """us per call, bytes of one weight, relative error of a plain call, and the weight copies."""
    first = weight(fmt, n, k)
    copies = max(2, min(64, math.ceil(256e6 / nbytes(first))))
    ws = [first] + [weight(fmt, n, k) for _ in range(copies - 1)]
    us = time_calls(fmt, x, ws, kw, None)
    err = error(fmt, x[:, :k] if x.shape[1] == k else torch.randn(1, k, dtype=x.dtype, device=DEVICE), first)
    return us, nbytes(first), err, ws


def time_calls(fmt: str, x: torch.Tensor, ws: list, kw: dict[str, Any], config: QGemvConfig | None) -> float:
    return graph_time_us([lambda w=w: call(fmt, x, w, kw, config) for w in ws])


def sweep(x: torch.Tensor, fmt: str, n: int, k: int, kw: dict[str, Any], ws: list) -> tuple[float, str]:
    bits = 4 if fmt.startswith("int4") else 8
    best = (math.inf, "")
    default = default_qconfig(bits, 1, n, k, num_sms(x.device))
    for bn, bk, warps, gather in SWEEP:
        config = replace(default, block_n=bn, block_k=bk, num_warps=warps, gather=gather)
        try:
            us = time_calls(fmt, x, ws, kw, config)
        except Exception:  # a configuration that does not compile or fit
            continue
        best = min(best, (us, f"n{bn} k{bk} w{warps}{' gather' if gather else ''}"))
    return best


def row(*cells: object) -> str:
    widths = (5, 8, 6, 7, 9, 7, 8, 6, 5, 7, 13)
    return " ".join(f"{c!s:<{w}}" if i in (0, 1, 4) else f"{c!s:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["8b", "1b"], choices=sorted(SHAPES))
    ap.add_argument("--fused", action="store_true", help="time each projection with the step's fusions")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of launch configurations (quantized)")
    ap.add_argument("--gemm", action="store_true", help="also time the tl.dot kernel (qgemm) at one row, unfused")
    ap.add_argument("--prmt", action="store_true", help="bytes to floats by PTX prmt, not shifts and masks")
    args = ap.parse_args()
    qgemv.USE_PRMT = args.prmt
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth {copy / 1e9:.0f} GB/s (read + write){'; fused calls' if args.fused else ''}")
    header = row("model", "proj", "K", "N", "format", "MB", "us", "GB/s", "copy", "err", "default")
    print(header + ("  sweep best" if args.sweep else ""))
    print("-" * len(header))
    totals: dict[tuple[str, str], float] = {}
    formats = FORMATS + (("int8-gemm", "int4g128-gemm") if args.gemm and not args.fused else ())
    for model in args.models:
        layers, shapes = SHAPES[model]
        for name, k, n in shapes:
            x, kw = fusions(model, name, k, n) if args.fused else (torch.randn(1, k, dtype=DTYPE, device=DEVICE), {})
            for fmt in formats:
                us, size, err, ws = time_format(fmt, x, n, k, kw)
                gbs = size / (us * 1e-6)
                bits = 4 if fmt.startswith("int4") else 8
                c = default_qconfig(bits, 1, n, k, num_sms(x.device))
                config = "" if fmt == "bf16" else f"n{c.block_n} k{c.block_k} w{c.num_warps} s{c.split_k}"
                cells = (f"{size / 1e6:.1f}", f"{us:.1f}", f"{gbs / 1e9:.0f}", f"{gbs / copy:.2f}", f"{err:.1e}")
                line = row(model, name, k, n, fmt, *cells, config)
                if args.sweep and fmt != "bf16":
                    best_us, best = sweep(x, fmt, n, k, kw, ws)
                    line += f"  {best_us:8.1f} us {best}"
                print(line, flush=True)
                totals[(model, fmt)] = totals.get((model, fmt), 0.0) + (us if name == "lm_head" else layers * us)
                if name == "lm_head":
                    totals[(model, fmt + "_head")] = us
                del ws
    print("\nper decode step, projections only (layers x qkv/o/gate_up/down + lm_head), ms:")
    print(f"{'model':5s} " + " ".join(f"{fmt:>9s}" for fmt in formats) + "   (the same with a bf16 lm_head)")
    for model in args.models:
        step = [totals[(model, fmt)] / 1000 for fmt in formats]
        head = totals[(model, "bf16_head")]
        bf16_head = [(totals[(model, fmt)] - totals[(model, fmt + "_head")] + head) / 1000 for fmt in formats]
        print(f"{model:5s} " + " ".join(f"{v:9.2f}" for v in step) + "   " + " ".join(f"{v:6.2f}" for v in bf16_head))


if __name__ == "__main__":
    main()
