"""`kiln build --kv-cache-dtype fp8|int8`: the cache holds 1-byte keys and values with one scale per layer
and plane; the engine generates exactly what transformers generates when its attention reads keys and
values rounded the same way (float32, CPU), also through prefix-cache hits, chunked prefill and preemption."""

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
from kiln.kernels.kv_quant import KV_CACHE_DTYPES, load, store  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(10, 31))]
NEW_TOKENS = 10
CALIBRATION = "the quick brown fox jumps over the lazy dog. " * 40


def _reference_tokens(
    checkpoint: Path, kv_dtype: str, scales: tuple[tuple[float, float], ...], prompts: list[list[int]]
) -> list[list[int]]:
    """transformers' eager attention on keys/values stored and read back as the narrow cache does."""
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    dtype = KV_CACHE_DTYPES[kv_dtype]

    def narrow(module, query, key, value, *args, **kwargs):  # type: ignore[no-untyped-def]
        k_scale, v_scale = scales[module.layer_idx]
        key = load(store(key, dtype, k_scale), k_scale, key.dtype)
        value = load(store(value, dtype, v_scale), v_scale, value.dtype)
        return eager_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("narrow_kv_reference", narrow)
    model = load_reference(checkpoint)
    model.set_attn_implementation("narrow_kv_reference")
    return [greedy(model, p, NEW_TOKENS)[0] for p in prompts]


@pytest.mark.parametrize(("kv_dtype", "calibrated"), [("fp8", False), ("int8", True)])
def test_narrow_kv_cache_matches_transformers_on_the_rounded_keys_and_values(
    checkpoints, tmp_path, kv_dtype, calibrated
):
    checkpoint = checkpoints("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION)
    options = {"calib_data": str(calib), "calib_size": 1} if calibrated else {}
    # int8: prompts longer than a step (chunked prefill) sharing a prefix (a prefix-cache hit), in a pool
    # too small for both at once (preemption)
    shared = list(range(10, 31))
    prompts = PROMPTS if kv_dtype == "fp8" else [shared + [40, 41], shared + [50], list(range(60, 84))]
    if kv_dtype == "int8":
        options.update(max_num_tokens=16, tokens_per_block=8)
    engine = build_tiny_engine(checkpoint, tmp_path / "e", kv_cache_dtype=kv_dtype, **options)
    facts = read_manifest(engine).kv_cache
    assert facts is not None and (facts.dtype, facts.calibrated, len(facts.scales)) == (kv_dtype, calibrated, 2)
    assert (facts.scales[0] == (1.0, 1.0)) != calibrated
    want = _reference_tokens(checkpoint, kv_dtype, facts.scales, prompts)
    runtime = {"num_kv_blocks": 8} if kv_dtype == "int8" else {}
    llm = LLM(engine, **runtime)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    if kv_dtype == "int8":
        assert sum(o.metrics["num_preemptions"] for o in outs) > 0 and llm.engine.stats().prefix_hit_tokens > 0


def test_int8_kv_cache_needs_calibration_text(checkpoints, tmp_path):
    with pytest.raises(KilnError, match="int8 KV cache needs"):
        build_tiny_engine(checkpoints("llama"), tmp_path / "e", kv_cache_dtype="int8")
    assert not (tmp_path / "e").exists()
