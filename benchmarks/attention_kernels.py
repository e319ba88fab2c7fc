"""Time `kiln::paged_attention` on CUDA: the Triton kernels against the PyTorch reference.

    python benchmarks/attention_kernels.py [--batch 1 8 64] [--context 128 1024 4096] [--prefill 1x2048 8x512]

One Llama-3.1-8B-like layer by default (32 query heads, 8 kv heads, head_dim 128, bf16, block
size 16), random values and shuffled block tables. Decode: every sequence has one new token and
`context` tokens in all; prefill: `B x N` fresh prompts of N tokens. Times are medians of
triton.testing.do_bench over the op (KV write + attention); run eagerly, small steps mostly
time the host's launch overhead. "graph" replays a CUDA graph of one op call per layer over
`layers` layers (each its own cache, so the reads are not served from L2 unless everything
fits in it) and divides by the layer count. KV GB/s counts the keys and values
each decode step must read once (context x kv heads x head_dim x 2 x bytes) over the graph time;
prefill TFLOP/s counts 4 x heads x head_dim x the causal (query, key) pairs over the graph time.
Run from the repository root with kiln importable (`pip install -e .` or PYTHONPATH=.).

--sweep also times the attention kernels alone (cache already written) under other tile
configurations, decode through a CUDA graph, to check the shape-based defaults.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable

import torch
import triton

import kiln.kernels  # noqa: F401  (registers torch.ops.kiln.paged_attention)
from kiln.kernels.selection import selected


def make_step(
    counts: list[tuple[int, int]], args: argparse.Namespace, layers: int
) -> tuple[tuple[torch.Tensor, ...], int]:
    """(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc) and layer count."""
    dtype, bs, hkv, d = getattr(torch, args.dtype), args.block_size, args.kv_heads, args.head_dim
    need = [math.ceil((c + n) / bs) for c, n in counts]
    num_blocks = sum(need)
    cache = torch.empty(layers, 2, num_blocks, bs, hkv, d, dtype=dtype, device="cuda").normal_()
    perm = torch.randperm(num_blocks).tolist()
    width = max(need)
    tables, slots = [], []
    for (cached, new), n in zip(counts, need):
        table = [perm.pop() for _ in range(n)]
        tables.append(table + [0] * (width - n))
        slots += [table[p // bs] * bs + p % bs for p in range(cached, cached + new)]
    tokens = len(slots)
    new_counts = torch.tensor([n for _, n in counts])
    tensors = (
        torch.randn(tokens, args.heads, d, dtype=dtype, device="cuda"),
        torch.randn(tokens, hkv, d, dtype=dtype, device="cuda"),
        torch.randn(tokens, hkv, d, dtype=dtype, device="cuda"),
        cache,
        torch.tensor(slots, dtype=torch.int64, device="cuda"),
        torch.tensor(tables, dtype=torch.int32, device="cuda"),
        torch.tensor([c + n for c, n in counts], dtype=torch.int32, device="cuda"),
        torch.cat([torch.zeros(1, dtype=torch.int64), new_counts.cumsum(0)]).to("cuda", torch.int32),
    )
    return tensors, layers


def op_time_ms(step: tuple[torch.Tensor, ...], scale: float, backend: str) -> float:
    """The op's time with the kernel selection's `attention` = backend ("auto": Triton, or "reference")."""
    with selected(attention=backend):
        call = lambda: torch.ops.kiln.paged_attention(*step, 0, scale, -1, 0.0)  # noqa: E731
        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))


def graph_time_ms(step: tuple[torch.Tensor, ...], layers: int, scale: float) -> float:
    """Per-layer time of a CUDA graph replaying the Triton op once per layer."""
    call = lambda layer: torch.ops.kiln.paged_attention(*step, layer, scale, -1, 0.0)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in range(layers):
            call(layer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            call(layer)
    return float(triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")) / layers


def graph_of(fn: Callable[[], object]) -> Callable[[], None]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


PREFILL_SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 3), (128, 64, 8, 2), (32, 64, 4, 2)]
DECODE_SWEEP = [(64, 4, 2), (32, 4, 2), (128, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 3)]


def sweep(args: argparse.Namespace, scale: float) -> None:
    """Kernel-only times (us) of other configurations; the first of each list is the default's shape."""
    from kiln.kernels.triton import decode, prefill

    print("\nsweep, kernel only (cache already written), us:")
    for spec in args.prefill:
        batch, tokens = (int(x) for x in spec.lower().split("x"))
        (q, _, _, cache, _, tables, lens, starts), _ = make_step([(0, tokens)] * batch, args, 1)
        out = torch.empty_like(q)
        default = prefill.default_config(
            q.shape[0], batch, triton.next_power_of_2(args.heads // args.kv_heads), q.shape[2]
        )
        results = []
        for bm, bn, warps, stages in PREFILL_SWEEP:
            config = prefill.PrefillConfig(bm, bn, warps, stages)
            run = functools.partial(
                prefill.prefill_attention, q, cache, tables, lens, starts, 0, scale, -1, 0.0, out, config
            )
            try:
                results.append(
                    (1e3 * float(triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")), config)
                )
            except Exception as error:  # a configuration that does not fit (shared memory) is skipped
                print(f"  prefill {spec} {config}: {type(error).__name__}")
        ranked = sorted(results, key=lambda r: r[0])
        for micros, config in [r for i, r in enumerate(ranked) if i < 4 or r[1] == default]:
            mark = " (default)" if config == default else ""
            print(f"  prefill {spec:>8} {micros:9.1f}  {config}{mark}")
    for batch in args.batch:
        context = max(args.context)
        (q, _, _, cache, _, tables, lens, starts), _ = make_step([(context - 1, 1)] * batch, args, 1)
        out = torch.empty_like(q)
        splits = decode.choose_splits(batch, args.kv_heads, tables.shape[1] * args.block_size, q.device)
        results = []
        for split_count in sorted({max(1, splits // 2), splits, splits * 2}):
            for block_n, warps, stages in DECODE_SWEEP:
                config = decode.DecodeConfig(block_n, warps, stages)
                run = functools.partial(
                    decode.decode_attention, q, cache, tables, lens, starts, 0, scale, -1, 0.0, out, split_count, config
                )
                try:
                    replay = graph_of(run)
                    micros = 1e3 * float(triton.testing.do_bench(replay, warmup=10, rep=50, return_mode="median"))
                    results.append((micros, split_count, config))
                except Exception as error:
                    print(f"  decode B={batch} {config}: {type(error).__name__}")
        default = decode.default_config(args.head_dim)
        ranked = sorted(results, key=lambda r: r[0])
        for micros, split_count, config in [r for i, r in enumerate(ranked) if i < 4 or r[1:] == (splits, default)]:
            mark = " (default)" if (split_count, config) == (splits, default) else ""
            print(f"  decode B={batch:<3} ctx={context} {micros:8.1f}  splits={split_count:<3} {config}{mark}")


def layers_for(kv_bytes_per_layer: int, budget: int) -> int:
    return max(1, min(32, budget // max(kv_bytes_per_layer, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--prefill", nargs="+", default=["1x2048", "8x512"], help="BxN: B prompts of N tokens")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--cache-budget-gib", type=float, default=4.0, help="KV memory over all graph layers")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    args = parser.parse_args()
    torch.manual_seed(0)
    scale = args.head_dim**-0.5
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    budget = int(args.cache_budget_gib * 2**30)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype} block={args.block_size}\n")
    rows = []
    for batch in args.batch:
        for context in args.context:
            kv_bytes = batch * context * args.kv_heads * args.head_dim * 2 * elem
            step, layers = make_step([(context - 1, 1)] * batch, args, layers_for(kv_bytes, budget))
            ref = float("nan") if args.skip_reference else op_time_ms(step, scale, "reference")
            eager = op_time_ms(step, scale, "auto")
            graph = graph_time_ms(step, layers, scale)
            gbps = kv_bytes / (graph * 1e-3) / 1e9
            rows.append((f"decode B={batch} ctx={context}", ref, eager, graph, f"{gbps:8.0f} GB/s", layers))
            del step
    for spec in args.prefill:
        batch, tokens = (int(x) for x in spec.lower().split("x"))
        kv_bytes = batch * tokens * args.kv_heads * args.head_dim * 2 * elem
        step, layers = make_step([(0, tokens)] * batch, args, layers_for(kv_bytes, budget // 4))
        flops = 4 * args.heads * args.head_dim * batch * tokens * (tokens + 1) / 2
        ref = float("nan") if args.skip_reference else op_time_ms(step, scale, "reference")
        eager = op_time_ms(step, scale, "auto")
        graph = graph_time_ms(step, layers, scale)
        rows.append((f"prefill {batch}x{tokens}", ref, eager, graph, f"{flops / graph / 1e9:6.0f} TFLOP/s", layers))
        del step
    print(f"{'case':<26}{'reference ms':>13}{'triton ms':>11}{'graph ms':>10}{'speed-up':>10}  {'rate':>14}  layers")
    for name, ref, eager, graph, rate, layers in rows:
        best = graph if not math.isnan(graph) else eager
        print(f"{name:<26}{ref:13.3f}{eager:11.4f}{graph:10.4f}{ref / best:9.0f}x  {rate:>14}  {layers:>6}")
    if args.sweep:
        sweep(args, scale)


if __name__ == "__main__":
    main()
