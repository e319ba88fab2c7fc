"""A CPU engine's step: the batched attention path gives the reference's tokens, and the KV cache
is an inference tensor (so the attention ops skip torch's Python version-counter kernel)."""

from __future__ import annotations

from kiln import LLM, SamplingParams

PROMPTS = [[5, 6, 7], list(range(10, 40)), list(range(50, 67))]  # unequal lengths: ragged block tables


def test_batched_cpu_attention_matches_the_reference(demo_engine):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = LLM(demo_engine, attention_kernel="reference")
    expected = [o.token_ids for o in reference.generate(PROMPTS, params)]
    llm = LLM(demo_engine)  # attention_kernel "auto": kiln.kernels.cpu_attention on the CPU
    assert llm.engine.device.type == "cpu"
    assert llm.engine.kv_cache.is_inference()
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expected
