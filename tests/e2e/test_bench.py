"""`kiln bench` on the CPU: the table, the JSON report and the chart, side by side with transformers."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import DEMO, kiln


def test_bench_reports_kiln_and_transformers_with_ratios(demo_engine, tmp_path):
    out = tmp_path / "bench"
    proc = kiln(
        "bench",
        str(demo_engine),
        "--compare-hf",
        str(DEMO),
        "--hf-systems",
        "eager",
        "--batch-sizes",
        "1,2",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--throughput",
        "--num-requests",
        "6",
        "--output-dir",
        str(out),
    )
    report = json.loads((out / "bench.json").read_text())
    systems = [(r["system"], r["batch"]) for r in report["latency"]]
    assert systems == [("kiln", 1), ("kiln", 2), ("transformers eager", 1), ("transformers eager", 2)]
    for row in report["latency"]:
        assert row["ms_per_token"] > 0 and row["ttft_ms"] > 0
        # every sequence began in the same step (16 prompt tokens fit one), so each had 5 tokens left
        assert row["decode_tokens"] == row["batch"] * (6 - 1)
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 1000 / row["ms_per_token"], rel=1e-12)
        # the same quotient, up to the rounding of the GB/s conversions
        assert 0 < row["roofline_fraction"] == pytest.approx(row["achieved_gb_s"] / report["copy_gb_s"], rel=1e-12)
    kiln_1 = report["latency"][0]
    assert kiln_1["vs_system"] == "transformers eager"
    assert kiln_1["vs_transformers"] == kiln_1["tokens_per_s"] / report["latency"][2]["tokens_per_s"]
    assert report["weight_bytes"] > 4_000_000  # the demo's 4.3 MB of weights
    (throughput,) = report["throughput"]
    assert throughput["num_requests"] == 6 and throughput["output_tokens_per_s"] > 0
    assert throughput["preemptions"] >= 0 and throughput["kv_cache_tokens"] > 0
    steps = throughput["steps"]  # each request: 8 prompt tokens, then 5 decode steps (the 6th token ends it)
    computed = sum(row["tokens"] for row in steps.values())
    # On a GPU decode steps are pipelined: a request that ended meanwhile computed one token past its end.
    pipelined = "decode, pipelined" in steps
    extra = computed - 6 * (8 + 5)
    assert extra >= 0 and (extra <= (6 if pipelined else 0) or throughput["preemptions"] > 0)
    decode_rows = sum(row["rows"] for kind, row in steps.items() if kind.startswith("decode"))
    assert steps["mixed"]["steps"] >= 1 and decode_rows >= 6
    assert sum(row["wall_s"] for row in steps.values()) <= throughput["total_s"]
    assert "where the throughput run's time went" in proc.stdout
    assert (out / "bench.png").stat().st_size > 10_000
    assert report["baselines"] == ["transformers eager"]
    assert "vs transformers eager" in proc.stdout and "output tok/s" in proc.stdout
    assert throughput["output_tokens"] == 6 * 6


def test_bench_refuses_shapes_the_engine_cannot_hold(demo_engine, tmp_path):
    proc = kiln("bench", str(demo_engine), "--input-len", "500", "--output-len", "100", check=False)
    assert proc.returncode == 2 and "does not fit this engine" in proc.stderr
    proc = kiln("bench", str(demo_engine), "--batch-sizes", "1,x", check=False)
    assert proc.returncode == 2 and "--batch-sizes" in proc.stderr
    # The demo engine runs at most 8 sequences a step: 100 would run in waves. Refused before anything loads.
    proc = kiln(
        "bench", str(demo_engine), "--batch-sizes", "1,100", "--input-len", "8", "--output-len", "6", check=False
    )
    assert proc.returncode == 2 and "--batch-sizes 100" in proc.stderr and "max_batch_size (8)" in proc.stderr
    assert "load engine" not in proc.stderr and "kiln batch" not in proc.stderr
