"""`kiln build --kv-cache-dtype int8`: the cache holds 1-byte keys and values with one calibrated scale per
layer and plane; the engine generates exactly what transformers generates when its attention reads keys and
values rounded the same way (float32, CPU), through prefix-cache hits, chunked prefill and preemption."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

from hf_reference import greedy, load_reference  # noqa: E402
from tiny_checkpoints import build_tiny_engine  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.engine.manifest import read_manifest  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from tests.narrow_reference import use_narrow_kv  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(10, 31))]
NEW_TOKENS = 10
CALIBRATION = "the quick brown fox jumps over the lazy dog. " * 40


def test_int8_kv_cache_matches_transformers_through_chunks_prefix_hits_and_preemption(checkpoints, tmp_path):
    """Prompts longer than a step (chunked prefill) sharing a prefix (a prefix-cache hit) in a pool too small
    for all at once (preemption). (fp8 with scale 1.0: tests/e2e/test_fp8_build.py.)"""
    checkpoint = checkpoints("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION)
    options = {"calib_data": str(calib), "calib_size": 1, "max_num_tokens": 16, "tokens_per_block": 8}
    engine = build_tiny_engine(checkpoint, tmp_path / "e", kv_cache_dtype="int8", **options)
    facts = read_manifest(engine).kv_cache
    assert facts is not None and (facts.dtype, facts.calibrated, len(facts.scales)) == ("int8", True, 2)
    assert all(0 < s < 1 for pair in facts.scales for s in pair)
    shared = list(range(10, 31))
    prompts = [shared + [40, 41], shared + [50], list(range(60, 84))]
    model = load_reference(checkpoint)
    use_narrow_kv(model, "int8", facts.scales)
    want = [greedy(model, p, NEW_TOKENS)[0] for p in prompts]
    llm = LLM(engine, num_kv_blocks=8)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0 and llm.engine.stats().prefix_hit_tokens > 0


def test_int8_kv_cache_needs_calibration_text(checkpoints, tmp_path):
    with pytest.raises(KilnError, match="int8 KV cache needs"):
        build_tiny_engine(checkpoints("llama"), tmp_path / "e", kv_cache_dtype="int8")
    assert not (tmp_path / "e").exists()
