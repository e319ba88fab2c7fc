"""The `kiln bench` driver: run what was asked, print the tables, write JSON and the chart."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.bench import limits, measure, report, roofline
from kiln.config import kv_cache_torch_dtype, torch_dtype
from kiln.engine.manifest import check_compatible, read_manifest
from kiln.engine.weight_bytes import module_weight_bytes
from kiln.errors import KilnError


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    engine: str
    batch_sizes: tuple[int, ...] = (1,)
    input_len: int = 128
    output_len: int = 256
    compare_hf: str | None = None
    hf_systems: tuple[str, ...] = ("eager", "static")
    throughput: bool = False
    num_requests: int = 1000
    output_dir: Path = Path("bench-results")
    runtime: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise KilnError(f"--batch-sizes must be positive integers, got {self.batch_sizes}")
        if self.input_len < 1 or self.output_len < 2:
            raise KilnError("--input-len must be >= 1 and --output-len >= 2")
        unknown = set(self.hf_systems) - {"eager", "static"}
        if unknown:
            raise KilnError(f"--hf-systems takes eager and/or static, got {sorted(unknown)}")
        if self.num_requests < 1:
            raise KilnError("--num-requests must be >= 1")


def run(options: BenchOptions, argv: list[str] | None = None) -> dict[str, Any]:
    from kiln.api import LLM

    manifest = read_manifest(Path(options.engine))
    build, facts = manifest.build, manifest.model
    limits.check_shapes(options.batch_sizes, options.input_len, options.output_len, build)
    # Before the engine loads: its KV pool takes most of the memory the copy's two buffers need.
    copy_bw = roofline.copy_bandwidth(check_compatible(manifest))
    llm = LLM(options.engine, progress=True, **(options.runtime or {}))
    engine = llm.engine
    pool = engine.stats()
    limits.check_kv_pool(options.batch_sizes, options.input_len, options.output_len, pool.kv_blocks, pool.kv_block_size)
    dtype = torch_dtype(build.dtype)
    kv_item = kv_cache_torch_dtype(build).itemsize  # 1 for an fp8 / int8 cache
    kv_token = roofline.kv_bytes_per_token(facts.num_layers, facts.num_kv_heads, facts.head_dim, kv_item)
    device_name = (
        torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else platform.processor() or "cpu"
    )
    out: dict[str, Any] = {
        "engine": str(options.engine),
        "engine_name": Path(options.engine).resolve().name,
        "device": device_name,
        "versions": {"torch": torch.__version__, "kiln": engine.manifest.kiln_version},
        "command": " ".join(["kiln", *(argv or ["bench", str(options.engine)])]),
        "copy_gb_s": copy_bw / 1e9,
        "weight_bytes": engine.weight_bytes,
        "latency": [],
        "throughput": [],
    }
    mean_context = options.input_len + options.output_len / 2
    latency: list[dict[str, Any]] = []
    for batch in options.batch_sizes:
        r = measure.kiln_latency(llm, batch, options.input_len, options.output_len)
        latency.append(
            {
                **r.to_dict(),
                "weight_bytes": engine.weight_bytes,
                "step_bytes": roofline.decode_step_bytes(engine.weight_bytes, kv_token, batch, mean_context),
            }
        )
        _progress(f"kiln batch {batch}: {r.ms_per_token:.3f} ms/token, TTFT {r.ttft_ms:.1f} ms")
    if options.throughput:
        t = measure.kiln_throughput(llm, options.num_requests, options.input_len, options.output_len)
        out["throughput"].append(t.to_dict())
        _progress(f"kiln throughput: {t.output_tokens_per_s:.0f} output tokens/s")
    device = engine.device
    del llm, engine  # give the baseline the device memory
    if options.compare_hf:
        latency += _transformers_latency(options, out, dtype, device, kv_token, mean_context)
    out["latency"] = report.latency_rows(latency, copy_bw)
    out["baselines"] = report.baselines(out["latency"])  # what the vs_transformers ratios are taken against
    options.output_dir.mkdir(parents=True, exist_ok=True)
    report.print_tables(out)
    report.write_json(out, options.output_dir / "bench.json")
    charted = report.write_chart(out, options.output_dir / "bench.png")
    where = f"{options.output_dir / 'bench.json'}" + (f" and {options.output_dir / 'bench.png'}" if charted else "")
    _progress(f"written to {where}" + ("" if charted else " (no chart: matplotlib is not installed)"))
    return out


def _transformers_latency(
    options: BenchOptions,
    out: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    kv_token: int,
    mean_context: float,
) -> list[dict[str, Any]]:
    import gc

    import transformers

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["versions"]["transformers"] = transformers.__version__
    assert options.compare_hf is not None
    hf = measure.TransformersBaseline(options.compare_hf, dtype, device)
    weights = module_weight_bytes(hf.model)  # its own: dense where a quantized engine's are packed
    rows = []
    for system in options.hf_systems:
        for batch in options.batch_sizes:
            r = hf.latency(batch, options.input_len, options.output_len, static=system == "static")
            step = roofline.decode_step_bytes(weights, kv_token, batch, mean_context)
            rows.append({**r.to_dict(), "weight_bytes": weights, "step_bytes": step})
            _progress(f"{r.system} batch {batch}: {r.ms_per_token:.3f} ms/token")
    return rows


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
