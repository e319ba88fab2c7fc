"""`kiln bench` refuses shapes it cannot time as asked, counts what it times, and names its baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_checkpoints import build_tiny_engine

from kiln.bench import limits, measure, report
from kiln.config import BuildConfig
from kiln.errors import KilnError

DEMO = Path(__file__).resolve().parents[2] / "demo" / "tiny-kiln"
BUILD = BuildConfig(max_batch_size=8, max_input_len=128, max_seq_len=512).resolved(None)


def test_batch_sizes_above_max_batch_size_are_refused():
    limits.check_shapes((1, 8), 128, 256, BUILD)  # at the limit: fine
    with pytest.raises(KilnError) as err:
        limits.check_shapes((1, 8, 100), 128, 256, BUILD)
    message = str(err.value)
    assert "--batch-sizes 100" in message and "max_batch_size (8)" in message


def test_lengths_beyond_the_engine_are_refused():
    with pytest.raises(KilnError, match=r"--input-len 129 \+ --output-len 1 does not fit"):
        limits.check_shapes((1,), 129, 1, BUILD)
    with pytest.raises(KilnError, match="max_seq_len 512"):
        limits.check_shapes((1,), 128, 385, BUILD)


def test_batches_the_kv_pool_cannot_hold_at_full_length_are_refused():
    # 100 + 28 tokens fill 8 blocks of 16; 20 blocks hold two such sequences, not three.
    assert limits.blocks_per_sequence(100, 28, 16) == 8 and limits.blocks_per_sequence(100, 29, 16) == 9
    limits.check_kv_pool((1, 2), 100, 28, kv_blocks=20, block_size=16)
    with pytest.raises(KilnError) as err:
        limits.check_kv_pool((1, 2, 3), 100, 28, kv_blocks=20, block_size=16)
    message = str(err.value)
    assert "--batch-sizes 3" in message and "holds only 2 sequence(s)" in message and "--num-kv-blocks" in message


def _row(system: str, batch: int, ms: float) -> dict:
    r = measure.LatencyResult(system, batch, 8, 5, 1.0, ms, 1.0, batch * 4)
    return {**r.to_dict(), "step_bytes": 1e6}


def test_the_ratio_column_names_its_baseline():
    rows = report.latency_rows(
        [_row("kiln", 1, 2.0), _row("transformers eager", 1, 3.0), _row("transformers static+compile", 1, 4.0)],
        copy_bytes_per_s=1e9,
    )
    # each row against the first of static+compile, eager that is not itself
    static, eager = "transformers static+compile", "transformers eager"
    assert [r["vs_system"] for r in rows] == [static, static, eager]
    assert [r["vs_transformers"] for r in rows] == pytest.approx([2.0, 4.0 / 3.0, 0.75], rel=1e-12)
    assert report.baselines(rows) == [static, eager]
    title, cells = report.ratio_column(rows)  # two baselines: each cell names its own
    assert title == "vs transformers" and cells == ["2.00x static+compile", "1.33x static+compile", "0.75x eager"]
    one = report.latency_rows([_row("kiln", 1, 2.0), _row("transformers eager", 1, 3.0)], copy_bytes_per_s=1e9)
    assert report.ratio_column(one) == ("vs transformers eager", ["1.50x", "-"])
    assert report.ratio_column(report.latency_rows([_row("kiln", 1, 2.0)], 1e9)) == ("vs transformers", ["-"])


def test_the_ratio_is_of_counted_tokens_per_s():
    # Same ms per step, but half of kiln's batch began two steps early: 12 tokens after the TTFT, not 16.
    staggered = measure.LatencyResult("kiln", 4, 8, 5, 1.0, 2.0, 1.0, decode_tokens=12)
    rows = [{**staggered.to_dict(), "step_bytes": 1e6}, _row("transformers eager", 4, 2.0)]
    assert report.latency_rows(rows, copy_bytes_per_s=1e9)[0]["vs_transformers"] == pytest.approx(12 / 16, rel=1e-12)


def test_tokens_per_s_counts_the_tokens_generated_after_the_ttft():
    together = measure.LatencyResult("kiln", 4, 8, 5, 1.0, 2.0, 1.0, decode_tokens=4 * 4)
    assert together.tokens_per_s == pytest.approx(4 * 1000 / 2.0, rel=1e-12)
    # Half the batch began two steps early and had two tokens fewer left after the TTFT.
    staggered = measure.LatencyResult("kiln", 4, 8, 5, 1.0, 2.0, 1.0, decode_tokens=4 * 4 - 2 * 2)
    assert staggered.tokens_per_s == pytest.approx(12 * 1000 / (2.0 * 4), rel=1e-12)
    throughput = measure.ThroughputResult("kiln", 10, 8, 5, total_s=2.0, mean_ttft_s=0.1, output_tokens=47)
    assert throughput.output_tokens_per_s == 23.5 and throughput.total_tokens_per_s == (80 + 47) / 2.0


def test_a_batch_prefilled_over_several_steps_is_counted_not_assumed(checkpoints, tmp_path):
    from kiln import LLM

    # 8 tokens a step: the four 6-token prompts begin over four steps (6+2, 1+4+3, 2+3+3, 3+3 tokens) and
    # those that began decode meanwhile, so after the TTFT 1, 2, 3 and 4 tokens are left, not 4 x 4.
    engine = build_tiny_engine(checkpoints("llama"), tmp_path / "e", max_num_tokens=8)
    r = measure.kiln_latency(LLM(engine), batch=4, input_len=6, output_len=5)
    assert r.batch == 4 and 0 < r.ttft_ms < r.total_s * 1000
    assert r.decode_tokens == 1 + 2 + 3 + 4
    assert r.tokens_per_s < 4 * 1000 / r.ms_per_token
    assert r.ms_per_token == pytest.approx((r.total_s * 1000 - r.ttft_ms) / 4, rel=1e-9)


def test_a_static_cache_row_says_compile_only_when_transformers_compiled():
    import torch

    assert measure.system_name(static=True, compiled=True) == "transformers static+compile"
    assert measure.system_name(static=False, compiled=True) == "transformers eager"
    # On the CPU transformers' generate does not compile a static-cache model: the row must not say it did.
    hf = measure.TransformersBaseline(str(DEMO), torch.float32, torch.device("cpu"))
    static = hf.latency(batch=2, input_len=4, output_len=3, static=True)
    assert static.system == "transformers static" and static.decode_tokens == 2 * 2
    # TTFT and the whole run come from one generate: the steps after the first token take the rest
    assert 0 < static.ttft_ms < static.total_s * 1000 and static.ms_per_token > 0
    assert hf.latency(batch=1, input_len=4, output_len=3, static=False).system == "transformers eager"
