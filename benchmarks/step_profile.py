"""Where one engine step of a throughput run goes: a mixed step (prompt chunks + decode rows) and a
decode step at a large batch, timed with CUDA events and profiled by kernel group.

    python benchmarks/step_profile.py ENGINE [--decode-rows 211] [--context 1500]
        [--prompts 6] [--prompt-len 1000] [--json OUT]

The steps are built directly (no scheduler: blocks come from the model runner's block manager):
`--decode-rows` sequences of `--context` cached tokens each gain one token, and `--prompts` new
prompts of `--prompt-len` tokens are computed in the same step. The KV cache holds whatever the
pool holds (speed does not depend on values).
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import torch

from kiln import LLM, SamplingParams
from kiln.kernels.selection import selected
from kiln.runtime.scheduler import ScheduledChunk
from kiln.runtime.sequence import Sequence

# Kernel name patterns, first match wins.
GROUPS = (
    ("attention: prefill kernel", r"_prefill_kernel"),
    ("attention: decode + merge", r"_decode_kernel|_merge_kernel"),
    ("KV write", r"_kv_write_kernel"),
    ("linear: Triton", r"_linear_kernel|_sum_splits_kernel"),
    ("linear: cuBLAS / CUTLASS", r"gemm|cutlass|nvjet|sm90_|cublas|splitK"),
    ("sampling", r"argmax"),
    ("Inductor fused", r"^triton_"),
)


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def make_chunks(llm: LLM, decode_rows: int, context: int, prompts: int, prompt_len: int) -> list[ScheduledChunk]:
    engine = llm.engine
    vocab = engine.manifest.model.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    chunks = []
    for i in range(decode_rows + prompts):
        decode = i < decode_rows
        length = context + 1 if decode else prompt_len
        seq = Sequence(f"profile-{i}", torch.randint(10, vocab - 1, (length,), generator=g).tolist(), params)
        if not engine.runner.kv.allocate(seq.request_id, length):
            raise SystemExit(f"the KV pool cannot hold {decode_rows} x {context} + {prompts} x {prompt_len} tokens")
        chunks.append(ScheduledChunk(seq, context, 1) if decode else ScheduledChunk(seq, 0, prompt_len))
    return chunks


def time_step(llm: LLM, chunks: list[ScheduledChunk], repeats: int) -> list[float]:
    runner = llm.engine.runner
    for _ in range(2):
        runner.run(chunks)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        runner.run(chunks)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)


def profile_step(llm: LLM, chunks: list[ScheduledChunk]) -> dict[str, Any]:
    runner = llm.engine.runner
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            runner.run(chunks)
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    kernels: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.self_device_time_total / 3
        group = group_of(e.key)
        groups[group] = groups.get(group, 0.0) + us
        kernels[e.key] = [us, e.count / 3]
    total = sum(groups.values()) or 1.0
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "device_ms": total / 1000,
        "groups_ms": {k: v / 1000 for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": k[:90], "ms": v[0] / 1000, "calls": v[1]} for k, v in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--decode-rows", type=int, default=211)
    ap.add_argument("--context", type=int, default=1500)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--decode-batch", type=int, default=249, help="rows of the pure decode step")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    llm = LLM(args.engine)
    with selected(llm.engine.kernels):  # the runner is called outside Engine.step: select the engine's kernels
        run(llm, args)


def run(llm: LLM, args: argparse.Namespace) -> None:
    engine = llm.engine
    report: dict[str, Any] = {}
    shapes = {
        "mixed": (args.decode_rows, args.prompts),
        "prompts only": (0, args.prompts),
        "decode rows only (eager)": (args.decode_rows, 0),
        "decode (CUDA graph)": (args.decode_batch, 0),
    }
    for name, (rows, prompts) in shapes.items():
        chunks = make_chunks(llm, rows, args.context, prompts, args.prompt_len)
        graphs = engine.runner.graphs
        if name != "decode (CUDA graph)":
            engine.runner.graphs = None
        try:
            times = time_step(llm, chunks, args.repeats)
            profile = profile_step(llm, chunks)
        finally:
            engine.runner.graphs = graphs
            for c in chunks:
                engine.runner.kv.free(c.seq.request_id)
        tokens = sum(c.num_tokens for c in chunks)
        report[name] = {"rows": len(chunks), "tokens": tokens, "median_ms": times[len(times) // 2], **profile}
        print(f"\n{name}: {len(chunks)} rows, {tokens} tokens, median {times[len(times) // 2]:.2f} ms")
        for group, ms in profile["groups_ms"].items():
            print(f"  {group:32s} {ms:8.2f} ms {ms / profile['device_ms']:6.1%}")
        for k in profile["top_kernels"][:6]:
            print(f"    {k['ms']:8.2f} ms  x{k['calls']:.0f}  {k['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
