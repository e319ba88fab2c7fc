"""Where a decode step's time goes: tok/s with and without CUDA graphs, and a kernel profile.

    python benchmarks/decode_profile.py ENGINE [--batch 1] [--input-len 128] [--output-len 256]

Generates `--batch` prompts of `--input-len` random token ids, `--output-len` tokens each (greedy,
EOS ignored), reports decode tokens/s per sequence and in total, then profiles a few decode steps
with torch.profiler and prints the CUDA kernels by their share of device time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kiln import LLM, SamplingParams


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab - 1, (length,), generator=g).tolist() for _ in range(batch)]


def decode_speed(llm: LLM, batch: list[list[int]], output_len: int) -> dict[str, float]:
    llm.generate(batch, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm up
    torch.cuda.synchronize()
    waited = [0.0]
    real_sync = torch.cuda.Event.synchronize

    def timed_sync(event: torch.cuda.Event) -> None:  # the host's waits for the device
        t0 = time.perf_counter()
        real_sync(event)
        waited[0] += time.perf_counter() - t0

    torch.cuda.Event.synchronize = timed_sync  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        outs = llm.generate(batch, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        torch.cuda.Event.synchronize = real_sync  # type: ignore[method-assign]
    ttft = max(o.metrics["time_to_first_token_s"] for o in outs)
    step_ms = (total - ttft) / (output_len - 1) * 1000
    return {
        "ttft_ms": ttft * 1000,
        "ms_per_step": step_ms,
        "tok_s_per_seq": 1000 / step_ms,
        "tok_s_total": len(batch) * 1000 / step_ms,
        "host_busy_ms_per_step": (total - waited[0]) / output_len * 1000,
    }


def print_critical_path(prof: torch.profiler.profile, top: int, steps: int = 5) -> None:
    """Device time attributed along the timeline: each kernel or copy is charged for how far it moved
    the end of the device's work (including any idle gap before it), so kernels that overlap under
    PDL are charged only what they added, and the charges add up to the span of the profiled steps."""
    events = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    if not events:
        return
    charged: dict[str, float] = {}
    frontier = events[0].time_range.start
    for e in events:
        added = max(0.0, e.time_range.end - frontier)
        frontier = max(frontier, e.time_range.end)
        charged[e.name[:70]] = charged.get(e.name[:70], 0.0) + added
    span = sum(charged.values()) or 1.0
    print(f"\ncritical path of {steps} steps: {span / steps / 1000:.3f} ms per step")
    print(f"{'kernel or copy':70s} {'us/step':>9s} {'share':>6s}")
    for name, us in sorted(charged.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{name:70s} {us / steps:9.1f} {us / span:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--no-graph-run", action="store_true", help="skip the run without CUDA graphs")
    ap.add_argument("--top", type=int, default=30, help="kernels to list")
    args = ap.parse_args()
    results = {}
    for graphs in (True, False) if not args.no_graph_run else (True,):
        llm = LLM(args.engine, cuda_graphs=graphs, kv_cache_memory_fraction=0.5)
        batch = prompts(args.batch, args.input_len, llm.engine.manifest.model.vocab_size)
        results["graphs" if graphs else "no_graphs"] = decode_speed(llm, batch, args.output_len)
        if graphs:
            profile_llm = llm
        else:
            del llm
    engine = profile_llm.engine
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(engine.validate(p, params)) for p in batch]
    for _ in range(4):  # prefill and a few decode steps before the profiled ones
        engine.step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    for s in seqs:
        engine.abort(s.request_id)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_total = sum(e.self_device_time_total for e in events) or 1.0
    print(f"{'kernel':70s} {'calls':>6s} {'us/step':>9s} {'share':>6s}")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
        share = e.self_device_time_total / device_total
        print(f"{e.key[:70]:70s} {e.count // 5:6d} {e.self_device_time_total / 5:9.1f} {share:6.1%}")
    waits = sum(
        e.cpu_time_total
        for e in prof.key_averages()
        if e.key in ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")
    )
    kernels = sum(e.count for e in events) / 5
    print(f"device time per step: {device_total / 5 / 1000:.3f} ms, kernels per step: {kernels:.0f}")
    host_ms = (wall * 1e6 - waits) / 5 / 1000
    print(f"host per step (profiled, waits excluded): {host_ms:.3f} ms of {wall / 5 * 1000:.3f} ms")
    print_critical_path(prof, args.top)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
