"""Time small-M linears on CUDA: cuBLAS (`F.linear`) against kiln's Triton kernel (`kiln.kernels.triton.gemv`).

    python benchmarks/linear_kernels.py [--models 1b 8b] [--m 1 4 16 64] [--sweep] [--dtype bfloat16]

Shapes are Llama-3.2-1B's and Llama-3.1-8B's projections as kiln runs them after `fuse_projections`
(qkv and gate_up fused), plus the unfused k/v and gate/up widths and lm_head. Each timing replays a
CUDA graph of back-to-back calls, each on its own copy of the weight (at least 256 MB of weights in
all, so they come from HBM, not the 50 MB L2), with one shared x [M, K]; the time per call is
the median graph time (triton.testing.do_bench) over the call count, inter-kernel gaps included,
as in a decode step's graph. GB/s counts the weight bytes read (x and the output are small);
"copy" is that rate over the measured device-to-device copy bandwidth (bytes read + written).

--sweep also times other kernel configurations per shape (1B shapes, M = 1, 4, 16) to check the
shape-based defaults of `gemv.default_config`. Run from the repository root with PYTHONPATH=.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from kiln.kernels.triton.gemv import GemvConfig, default_config, linear_triton, num_sms

SHAPES: dict[str, list[tuple[str, int, int]]] = {  # name, K (in features), N (out features)
    "1b": [
        ("qkv", 2048, 3072),
        ("o", 2048, 2048),
        ("gate_up", 2048, 16384),
        ("down", 8192, 2048),
        ("k|v", 2048, 512),
        ("gate|up", 2048, 8192),
        ("lm_head", 2048, 128256),
    ],
    "8b": [
        ("qkv", 4096, 6144),
        ("o", 4096, 4096),
        ("gate_up", 4096, 28672),
        ("down", 14336, 4096),
        ("k|v", 4096, 1024),
        ("lm_head", 4096, 128256),
    ],
}

# (block_m, block_n, block_k, split_k, num_warps, num_stages, swap)
SWEEP_ONE_ROW = [
    (1, 8, 512, 1, 4, 1, False),
    (1, 8, 512, 1, 4, 3, False),
    (1, 4, 1024, 1, 4, 1, False),
    (1, 8, 1024, 1, 8, 1, False),
    (1, 16, 256, 1, 4, 1, False),
    (1, 16, 512, 1, 8, 1, False),
    (1, 8, 512, 2, 4, 1, False),
    (16, 64, 128, 0, 4, 4, True),
    (16, 32, 256, 0, 4, 3, False),
]
SWEEP_ROWS = [
    (16, 64, 128, 0, 4, 4, True),
    (16, 64, 128, 1, 4, 4, True),
    (16, 64, 256, 0, 4, 3, True),
    (16, 128, 128, 0, 8, 4, True),
    (16, 16, 256, 0, 4, 4, False),
    (16, 32, 128, 0, 4, 4, False),
    (16, 32, 256, 0, 4, 3, False),
    (2, 8, 256, 0, 4, 1, False),
    (4, 8, 256, 0, 4, 1, False),
]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
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


def weights(k: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    size = k * n * torch.finfo(dtype).bits // 8
    copies = max(2, min(64, math.ceil(256e6 / size)))
    return [torch.empty(n, k, dtype=dtype, device="cuda").normal_(std=k**-0.5) for _ in range(copies)]


def config_of(spec: tuple[int, int, int, int, int, int, bool], m: int, n: int, k: int) -> GemvConfig:
    """A sweep entry; split 0 means default_config's split for that tile."""
    bm, bn, bk, split, warps, stages, swap = spec
    if split == 0:
        programs = triton.cdiv(n, bn) * triton.cdiv(m, bm)
        split = 1
        while programs * split < num_sms(torch.device("cuda")) and k // (split * 2) >= 4 * bk:
            split *= 2
    return GemvConfig(bm, bn, bk, split, warps, stages, swap)


def time_kernel(x: torch.Tensor, ws: list[torch.Tensor], config: GemvConfig | None) -> float:
    return graph_time_us([lambda w=w: linear_triton(x, w, None, config) for w in ws])


def time_cublas(x: torch.Tensor, ws: list[torch.Tensor]) -> float:
    return graph_time_us([lambda w=w: F.linear(x, w) for w in ws])


def check(x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None) -> float:
    ref = x.float() @ w.float().T
    return float((linear_triton(x, w, None, config).float() - ref).abs().max() / (ref.abs().max() + 1e-6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--sweep", action="store_true", help="also time other kernel configurations (1B shapes)")
    ap.add_argument("--sweep-m", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument(
        "--sweep-one-row",
        nargs="*",
        choices=sorted(SHAPES),
        help="time a wide grid of one-row configurations for every projection of these models",
    )
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}, {num_sms(torch.device('cuda'))} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}; copy bandwidth {copy / 1e9:.0f} GB/s (read + write)"
    )
    header = (
        f"{'model':5s} {'proj':8s} {'K':>6s} {'N':>7s} {'MB':>7s} {'M':>3s} | {'cuBLAS us':>9s} {'GB/s':>6s} "
        f"{'copy':>5s} | {'triton us':>9s} {'GB/s':>6s} {'copy':>5s} | {'speedup':>7s}  config"
    )
    print(header)
    print("-" * len(header))
    for model in args.models:
        for name, k, n in SHAPES[model]:
            ws = weights(k, n, dtype)
            mb = ws[0].numel() * ws[0].element_size() / 1e6
            for m in args.m:
                x = torch.randn(m, k, dtype=dtype, device="cuda")
                config = default_config(m, n, k, num_sms(x.device))
                t_blas = time_cublas(x, ws)
                try:
                    err, t_tri = check(x, ws[0], config), time_kernel(x, ws, config)
                except Exception as exc:  # report and go on
                    print(f"{model:5s} {name:8s} {k:6d} {n:7d} {m:3d} | {t_blas:9.2f} | {_short(config)}: {exc!r}")
                    continue
                bw_blas, bw_tri = mb * 1e6 / (t_blas * 1e-6), mb * 1e6 / (t_tri * 1e-6)
                flag = "" if err < 2e-2 else f"  ERROR {err:.2g}"
                print(
                    f"{model:5s} {name:8s} {k:6d} {n:7d} {mb:7.1f} {m:3d} | {t_blas:9.2f} {bw_blas / 1e9:6.0f} "
                    f"{bw_blas / copy:5.2f} | {t_tri:9.2f} {bw_tri / 1e9:6.0f} {bw_tri / copy:5.2f} | "
                    f"{t_blas / t_tri:7.2f}  {_short(config)}{flag}",
                    flush=True,
                )
            del ws
    if args.sweep:
        sweep(dtype, args.sweep_m)
    for model in args.sweep_one_row or []:
        sweep_one_row(dtype, model, copy)


def _short(c: GemvConfig) -> str:
    swap = " swap" if c.swap else ""
    return f"m{c.block_m} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}{swap}"


def sweep(dtype: torch.dtype, ms: list[int]) -> None:
    print("\nsweep (1B shapes): us per call of each configuration; * marks the fastest, cuBLAS for reference")
    for name, k, n in SHAPES["1b"]:
        if name == "lm_head":
            continue
        ws = weights(k, n, dtype)
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            specs = SWEEP_ONE_ROW if m == 1 else SWEEP_ROWS
            results: list[tuple[float, str]] = []
            for spec in specs:
                if spec[0] < 16 and spec[0] < m and spec[0] != 1 and m > 4:
                    continue  # CUDA-core tiles re-read the weight per row block
                config = config_of(spec, m, n, k)
                try:
                    err = check(x, ws[0], config)
                    t = time_kernel(x, ws, config)
                except Exception as exc:  # a configuration that does not compile here: report, go on
                    results.append((math.inf, f"{_short(config)}: {type(exc).__name__}"))
                    continue
                results.append((t, _short(config) + ("" if err < 2e-2 else f" ERROR {err:.2g}")))
            best = min(t for t, _ in results)
            line = "; ".join(f"{'*' if t == best else ''}{t:.2f} {label}" for t, label in results)
            print(f"{name:8s} M={m:2d} cuBLAS {time_cublas(x, ws):.2f} | {line}", flush=True)
        del ws


ONE_ROW_TILES = [(2, 1024), (2, 2048), (4, 512), (4, 1024), (4, 2048), (8, 256), (8, 512), (8, 1024), (16, 256)]


def sweep_one_row(dtype: torch.dtype, model: str, copy: float) -> None:
    """Every (tile, warps, split) for one row; prints the default's time and the five fastest."""
    print(f"\none-row sweep ({model}): us per call, fraction of copy bandwidth; default first")
    for name, k, n in SHAPES[model]:
        ws = weights(k, n, dtype)
        mb = ws[0].numel() * ws[0].element_size() / 1e6
        x = torch.randn(1, k, dtype=dtype, device="cuda")
        default = default_config(1, n, k, num_sms(x.device))
        configs = [default] + [
            GemvConfig(1, bn, bk, split, warps, 1)
            for bn, bk in ONE_ROW_TILES
            for warps in (2, 4, 8)
            for split in ((1, 2, 4) if k >= 8192 else (1,))
            if bk * split <= k
        ]
        results: list[tuple[float, str]] = []
        for config in configs:
            try:
                err = check(x, ws[0], config)
                t = time_kernel(x, ws, config)
            except Exception as exc:  # a configuration that does not compile here: report, go on
                results.append((math.inf, f"{_short(config)}: {type(exc).__name__}"))
                continue
            results.append((t, _short(config) + ("" if err < 2e-2 else f" ERROR {err:.2g}")))
        ranked = sorted(results[1:])[:5]
        cells = [f"{t:.2f} ({mb * 1e6 / (t * 1e-6) / copy:.2f}) {label}" for t, label in [results[0], *ranked]]
        print(f"{name:8s} {mb:6.1f} MB | default {cells[0]} | " + "; ".join(cells[1:]), flush=True)
        del ws


if __name__ == "__main__":
    main()
