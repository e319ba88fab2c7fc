"""SamplingParams(prompt_logprobs=k): each prompt token's log-prob equals transformers' log-softmax of
the teacher-forced logits, with chunked prefill and after a prefix-cache hit."""

from __future__ import annotations

import pytest
import torch
from e2e_helpers import DEMO
from transformers import AutoModelForCausalLM

from kiln.api import LLM, build
from kiln.sampling_params import SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet green woods."


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    # A step computes at most 8 tokens, so every prompt below is prefilled in several chunks.
    out = build(
        DEMO,
        tmp_path_factory.mktemp("plp") / "engine",
        progress=False,
        compile=False,
        max_num_tokens=8,
        max_seq_len=128,
    )
    return LLM(out, overlap_decode=False, num_kv_blocks=64)


@pytest.fixture(scope="module")
def reference():
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()

    def log_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return log_probs


def check(output, reference_log_probs: torch.Tensor, k: int) -> None:
    ids = output.prompt_token_ids
    scored = output.prompt_logprobs
    assert scored is not None and len(scored) == len(ids) and scored[0] is None
    for p in range(1, len(ids)):
        entry, row = scored[p], reference_log_probs[p - 1]
        assert entry.token_id == ids[p]
        assert entry.logprob == pytest.approx(row[ids[p]].item(), abs=1e-4)
        values, top_ids = torch.topk(row, k)
        assert len(entry.top) == k
        for (token, logprob), value in zip(entry.top, values.tolist()):
            assert logprob == pytest.approx(value, abs=1e-4)
            assert row[token].item() == pytest.approx(value, abs=1e-4)  # ties may order ids differently
        if k:
            assert entry.top[0][0] == top_ids[0].item() or row[entry.top[0][0]] == row[top_ids[0]]


def test_prompt_logprobs_match_transformers_with_chunked_prefill(llm, reference):
    ids = llm.encode(TEXT)
    assert len(ids) > 3 * 8  # several chunks
    out = llm.generate(TEXT, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    check(out, reference(ids), 3)
    plain = llm.generate(TEXT, SamplingParams(max_tokens=2, temperature=0))[0]
    assert plain.prompt_logprobs is None and plain.token_ids == out.token_ids


def test_prompt_logprobs_after_a_prefix_cache_hit(llm, reference):
    prefix = TEXT[:60]
    llm.generate(prefix, SamplingParams(max_tokens=1))  # its blocks are now cached
    warm = llm.generate(prefix + " More words.", SamplingParams(max_tokens=1))[0]
    assert warm.metrics["num_cached_tokens"] > 0  # the cache does hold the prefix
    out = llm.generate(prefix + " More words.", SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert out.metrics["num_cached_tokens"] == 0  # a scored prompt is computed in full
    check(out, reference(out.prompt_token_ids), 0)


def test_batch_mixes_scored_and_plain_requests(llm, reference):
    prompts = [TEXT, "Hello there, how are you today?", TEXT[:40]]
    params = [
        SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1),
        SamplingParams(max_tokens=3, temperature=0),
        SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2),
    ]
    outs = llm.generate(prompts, params)
    check(outs[0], reference(outs[0].prompt_token_ids), 1)
    assert outs[1].prompt_logprobs is None
    check(outs[2], reference(outs[2].prompt_token_ids), 2)
    alone = [llm.generate(p, SamplingParams(max_tokens=3, temperature=0))[0].token_ids for p in prompts]
    assert [o.token_ids for o in outs] == alone


def test_prompt_logprobs_survive_preemption(llm, reference):
    # A pool of 8 blocks of 16 tokens cannot hold three 30-character prompts growing by 40 tokens each.
    small = LLM(llm.engine.path, overlap_decode=False, num_kv_blocks=8)
    prompts = [TEXT[:30], TEXT[30:60], TEXT[60:90]]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=1)
    outs = small.generate(prompts, params)
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    for out in outs:
        check(out, reference(out.prompt_token_ids), 1)
