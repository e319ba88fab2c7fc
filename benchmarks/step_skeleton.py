"""Where a batch-1 decode step's time goes, from kiln's own ops replayed in one CUDA graph.

    PYTHONPATH=. python benchmarks/step_skeleton.py [--config llama-3.2-1b] [--context 256] [--sweep [NAMES]]

Builds a Llama decoder's decode step at one token from kiln's custom ops with random weights of
the real shapes (every layer its own weights, so they stream from HBM) and times variants of it,
each a CUDA graph replayed many times:

  linears      the 4 projections per layer and lm_head only (norms, residual adds and the
               rotary embedding fused into them as in an engine), no attention
  + attention  the same with paged decode attention (and its merge) at `--context` keys
  + rope       the q/k/v projection with the rotary embedding in its epilogue (kiln::linear_rope)
  only X       one projection of every layer back to back (its own fraction of the roofline)
  --sweep      each named projection (all without names) at 1-4 column tiles per program on
               4 and 8 warps, then the step with the fastest launch of each

Each is reported in microseconds per step and as a fraction of the roofline (weight bytes /
measured copy bandwidth), so the gap of each piece shows: what the projections lose to the
roofline on their own, and what attention adds on top. An engine step also embeds the token,
samples and runs a few small Inductor kernels (not here).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
from unittest import mock

import torch

import kiln.kernels  # noqa: F401  (registers the kiln ops)

CONFIGS = {  # hidden, intermediate, layers, q heads, kv heads, head dim, vocab
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256),
}
kiln = torch.ops.kiln
TILES = (1, 2, 3, 4)  # column tiles per program in the sweep (8 lost everywhere)


@contextlib.contextmanager
def one_row_launch(overrides: dict[tuple[int, int], tuple[int, int]]):  # type: ignore[no-untyped-def]
    """One-row projections of weight shape (N, K) in `overrides` launch with (tiles, warps) instead
    of their defaults, while the context is open (the launch is chosen when a graph is captured)."""
    from kiln.kernels.triton import gemv

    default = gemv.prologue_config

    def chosen(code: int, m: int, n: int, k: int, sms: int = 132) -> gemv.GemvConfig:
        config = default(code, m, n, k, sms)
        if m <= 1 and (n, k) in overrides:
            tiles, warps = overrides[(n, k)]
            config = gemv.replace(config, tiles=tiles, num_warps=warps)
        return config

    gemv.prologue_config = chosen  # type: ignore[assignment]
    try:
        yield
    finally:
        gemv.prologue_config = default


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1000)


class Step:
    def __init__(self, config: str, context: int, page: int = 16, max_seq: int = 2048) -> None:
        hidden, inter, layers, hq, hkv, d, vocab = CONFIGS[config]
        dev, dt = torch.device("cuda"), torch.bfloat16
        g = torch.Generator(device=dev).manual_seed(0)

        def w(n: int, k: int) -> torch.Tensor:
            return torch.randn(n, k, device=dev, dtype=dt, generator=g) * k**-0.5

        self.layers = [
            {
                "qkv": w((hq + 2 * hkv) * d, hidden),
                "o": w(hidden, hq * d),
                "gate_up": w(2 * inter, hidden),
                "down": w(hidden, inter),
                "norm1": 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dt, generator=g),
                "norm2": 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dt, generator=g),
            }
            for _ in range(layers)
        ]
        self.lm_head = w(vocab, hidden)
        self.norm_f = torch.ones(hidden, device=dev, dtype=dt)
        self.weight_bytes = sum(t.numel() * t.element_size() for lay in self.layers for t in lay.values())
        self.weight_bytes += self.lm_head.numel() * self.lm_head.element_size()
        self.hq, self.hkv, self.d = hq, hkv, d
        blocks = max_seq // page
        self.kv_cache = torch.randn(layers, 2, blocks + 1, page, hkv, d, device=dev, dtype=dt, generator=g)
        self.block_tables = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
        self.seq_lens = torch.tensor([context], dtype=torch.int32, device=dev)
        self.query_start_loc = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        self.slot_mapping = torch.tensor([context - 1], dtype=torch.int64, device=dev)
        angles = torch.rand(1, 1, d, device=dev) * 100
        self.cos, self.sin = angles.cos().to(dt), angles.sin().to(dt)
        self.x = torch.randn(1, hidden, device=dev, dtype=dt, generator=g)
        self.scale = d**-0.5

    def projection(self, name: str) -> tuple[float, object]:
        """(weight bytes, a function calling that projection of every layer back to back, as the step calls it)."""
        rope_width = (self.hq + self.hkv) * self.d
        x, wide = self.x, torch.randn(1, 2 * self.layers[0]["down"].shape[1], device="cuda", dtype=self.x.dtype)
        calls = {
            "qkv": lambda lay: kiln.linear_rope(
                x, lay["qkv"], None, True, lay["norm1"], 1e-5, self.cos, self.sin, rope_width
            ),
            "o": lambda lay: kiln.linear(x[:, : lay["o"].shape[1]], lay["o"], None, True, x),
            "gate_up": lambda lay: kiln.rms_norm_linear(x, lay["norm2"], 1e-5, lay["gate_up"], None, True),
            "down": lambda lay: kiln.silu_mul_linear(wide, lay["down"], None, True, x),
            "gate_up (silu epilogue)": lambda lay: kiln.linear_silu_mul(
                x, lay["gate_up"], None, True, lay["norm2"], 1e-5
            ),
            "down (plain)": lambda lay: kiln.linear(wide[:, : lay["down"].shape[1]], lay["down"], None, True, x),
        }
        if name == "lm_head":
            return self.lm_head.numel() * 2.0, lambda: kiln.rms_norm_linear(
                x, self.norm_f, 1e-5, self.lm_head, None, True
            )
        weights = sum(lay[name.split()[0]].numel() * 2.0 for lay in self.layers)
        return weights, lambda: [calls[name](lay) for lay in self.layers]

    def shape_of(self, name: str) -> tuple[int, int]:
        """(N, K) of the weight of projection `name`."""
        weight = self.lm_head if name == "lm_head" else self.layers[0][name.split()[0]]
        return tuple(weight.shape)  # type: ignore[return-value]

    def run(self, attention: bool, rope: bool, gated: bool = False, table_width: int | None = None) -> torch.Tensor:
        """One step; table_width: pass only that many block-table columns (the decode kernel's
        split count comes from the table's width, so a narrower table means fewer splits)."""
        tables = self.block_tables if table_width is None else self.block_tables[:, :table_width]
        x = self.x
        q_width, rope_width = self.hq * self.d, (self.hq + self.hkv) * self.d
        for i, lay in enumerate(self.layers):
            if rope:
                qkv = kiln.linear_rope(x, lay["qkv"], None, True, lay["norm1"], 1e-5, self.cos, self.sin, rope_width)
            else:
                qkv = kiln.rms_norm_linear(x, lay["norm1"], 1e-5, lay["qkv"], None, True)
            if attention:
                q = qkv[:, :q_width].view(1, self.hq, self.d)
                k = qkv[:, q_width:rope_width].view(1, self.hkv, self.d)
                v = qkv[:, rope_width:].view(1, self.hkv, self.d)
                attn = kiln.paged_attention(
                    q,
                    k,
                    v,
                    self.kv_cache,
                    self.slot_mapping,
                    tables,
                    self.seq_lens,
                    self.query_start_loc,
                    i,
                    self.scale,
                    0,
                    0.0,
                    lay["o"],  # prefetch and prefetch_next, as prefetch_output_weights sets them
                    lay["gate_up"],
                ).view(1, q_width)
            else:
                attn = qkv[:, :q_width]
            x = kiln.linear(attn, lay["o"], None, True, x)
            if gated:
                act = kiln.linear_silu_mul(x, lay["gate_up"], None, True, lay["norm2"], 1e-5)
                x = kiln.linear(act, lay["down"], None, True, x)
            else:
                gate_up = kiln.rms_norm_linear(x, lay["norm2"], 1e-5, lay["gate_up"], None, True)
                x = kiln.silu_mul_linear(gate_up, lay["down"], None, True, x)
        return kiln.rms_norm_linear(x, self.norm_f, 1e-5, self.lm_head, None, True)


@contextlib.contextmanager
def decode_keywords(**options: object):  # type: ignore[no-untyped-def]
    """Within the block, the paged-attention op calls the decode kernels with these keywords of
    `decode_attention` (the diagnostics early_keys and prefetch_bytes)."""
    if not options:
        yield
        return
    from kiln.kernels.triton import attention

    with mock.patch.object(attention, "decode_attention", functools.partial(attention.decode_attention, **options)):
        yield


def graph_time_us(fn, replays: int = 200) -> float:  # type: ignore[no-untyped-def]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-3.2-1b", choices=sorted(CONFIGS))
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--json")
    ap.add_argument(
        "--sweep",
        nargs="?",
        const="qkv,o,gate_up (silu epilogue),down (plain),lm_head",
        help="time other one-row launches of these projections (comma-separated; all without a value)",
    )
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    step = Step(args.config, args.context)
    roofline_us = step.weight_bytes / bandwidth * 1e6
    rows = []
    for name, attention, rope, gated, decode_options in (
        ("linears", False, True, True, {}),
        ("linears + attention", True, False, False, {}),
        ("linears + attention, rope fused", True, True, False, {}),
        ("  + silu in gate/up (engine default)", True, True, True, {}),
        ("  the same, keys read after the wait", True, True, True, {"early_keys": False}),
        ("  the same, no L2 prefetch", True, True, True, {"prefetch_bytes": 0}),
        ("  the same, prefetch 8 MB", True, True, True, {"prefetch_bytes": 8 << 20}),
        ("  the same, prefetch 24 MB", True, True, True, {"prefetch_bytes": 24 << 20}),
    ):
        with decode_keywords(**decode_options):  # taken when the kernels launch, i.e. when the graph is captured
            us = graph_time_us(lambda a=attention, r=rope, gt=gated: step.run(a, r, gt))
        rows.append({"variant": name, "us_per_step": us, "of_roofline": roofline_us / us})
    from kiln.kernels.triton.decode import choose_splits

    page = step.kv_cache.shape[3]
    width = -(-args.context // page)
    while width <= step.block_tables.shape[1]:  # narrower block tables: fewer splits at this context
        splits = choose_splits(1, step.hkv, width * page, torch.device("cuda"))
        us = graph_time_us(lambda w=width: step.run(True, True, True, w))
        label = f"  table of {width * page} tokens: {splits} split(s)"
        rows.append({"variant": label, "us_per_step": us, "of_roofline": roofline_us / us})
        width *= 2
    projections = ("qkv", "o", "gate_up", "down", "gate_up (silu epilogue)", "down (plain)", "lm_head")
    for name in projections:
        nbytes, fn = step.projection(name)
        us = graph_time_us(fn)
        rows.append({"variant": f"only {name}", "us_per_step": us, "of_roofline": nbytes / bandwidth * 1e6 / us})
    if args.sweep:  # one-row launches of each projection: column tiles per program x warps
        picks = {}
        for name in args.sweep.split(","):
            nbytes, fn = step.projection(name)
            shape = step.shape_of(name)
            timed = []
            for tiles, warps in itertools.product(TILES, (4, 8)):
                with one_row_launch({shape: (tiles, warps)}):
                    us = graph_time_us(fn)
                timed.append((us, tiles, warps))
                label = f"only {name}, {tiles} tile(s), {warps} warps"
                rows.append({"variant": label, "us_per_step": us, "of_roofline": nbytes / bandwidth * 1e6 / us})
            picks[shape] = min(timed)[1:]
        with one_row_launch(picks):
            us = graph_time_us(lambda: step.run(True, True, True))
        label = "  with the fastest of each: " + ", ".join(f"{t}t{w}w" for t, w in picks.values())
        rows.append({"variant": label, "us_per_step": us, "of_roofline": roofline_us / us})
    print(
        f"{args.config}: {step.weight_bytes / 1e9:.3f} GB of weights, copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
        f"roofline {roofline_us:.1f} us, context {args.context}"
    )
    print(f"{'variant':40s} {'us/step':>9s} {'of roofline':>12s}")
    for r in rows:
        print(f"{r['variant']:40s} {r['us_per_step']:9.1f} {r['of_roofline']:12.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "roofline_us": roofline_us, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
