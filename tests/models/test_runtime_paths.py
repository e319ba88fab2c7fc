"""Chunked prefill and preemption change how tokens are scheduled, never which tokens come out."""

from __future__ import annotations

import pytest
from hf_reference import greedy, load_reference
from launch_spy import record_launches
from test_families import NEW_TOKENS, prompts
from tiny_checkpoints import build_tiny_engine

from kiln import LLM, SamplingParams
from kiln.runtime.step_observer import StepInfo


class StepTokens:
    """A step observer that keeps the tokens each step computed."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def step_started(self) -> None:
        pass

    def device_started(self) -> None:
        pass

    def device_finished(self) -> None:
        pass

    def step_finished(self, info: StepInfo) -> None:
        self.tokens.append(info.tokens)


@pytest.fixture(scope="module")
def reference_tokens(checkpoints):
    model = load_reference(checkpoints("mistral"))
    return [greedy(model, p, NEW_TOKENS)[0] for p in prompts()]


def test_chunked_prefill_under_a_small_token_budget(checkpoints, tmp_path, reference_tokens):
    # 8 tokens a step: the 13- and 21-token prompts are split over several steps, while the
    # 3-token prompt is already generating.
    engine = build_tiny_engine(checkpoints("mistral"), tmp_path / "e", max_num_tokens=8)
    llm = LLM(engine)
    steps = llm.engine.step_observer = StepTokens()
    outs = llm.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert max(steps.tokens) <= 8
    assert [o.token_ids for o in outs] == reference_tokens


def test_preemption_when_the_block_pool_runs_dry(checkpoints, tmp_path, reference_tokens):
    engine = build_tiny_engine(checkpoints("mistral"), tmp_path / "e", tokens_per_block=4)
    # 3 prompts need 1 + 4 + 6 blocks of 4 tokens to start and 4 + 7 + 9 to finish: 17 blocks force preemption.
    llm = LLM(engine, num_kv_blocks=17)
    outs = llm.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    assert [o.token_ids for o in outs] == reference_tokens
    assert llm.engine.stats().kv_free_blocks == 17


def test_prefix_reuse_across_requests(checkpoints, tmp_path):
    """Prompts that start like an earlier one attach its cached blocks and still match transformers."""
    ckpt = checkpoints("mistral")  # sliding window 8: reused blocks must still be masked by position
    engine = build_tiny_engine(ckpt, tmp_path / "e", tokens_per_block=4)
    base = prompts()[2]  # 21 tokens
    followers = [base[:17] + [5, 6, 7], base + [9], base[:9]]
    model = load_reference(ckpt)
    expected = [greedy(model, p, NEW_TOKENS)[0] for p in [base, *followers]]
    llm = LLM(engine)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    first = llm.generate([base], params)
    assert first[0].metrics["num_cached_tokens"] == 0
    outs = llm.generate(followers, params)
    assert [o.metrics["num_cached_tokens"] for o in outs] == [16, 20, 8]
    assert [o.token_ids for o in first + outs] == expected
    stats = llm.engine.stats()
    assert stats.prefix_hit_tokens == 44
    assert stats.kv_free_blocks == stats.kv_blocks


def test_prefix_caching_can_be_turned_off(checkpoints, tmp_path):
    engine = build_tiny_engine(checkpoints("mistral"), tmp_path / "e", tokens_per_block=4)
    llm = LLM(engine, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate([prompts()[2]], params)
    outs = llm.generate([prompts()[2]], params)
    assert outs[0].metrics["num_cached_tokens"] == 0 and llm.engine.stats().prefix_cached_blocks == 0


@pytest.mark.parametrize("num_kv_blocks", [None, 17], ids=["roomy", "preempting"])
def test_pipelined_decode_matches_transformers(checkpoints, tmp_path, reference_tokens, num_kv_blocks):
    """Decode steps launched before the previous step's tokens are read (the CUDA default), here on CPU."""
    engine = build_tiny_engine(checkpoints("mistral"), tmp_path / "e", tokens_per_block=4)
    runtime = {"overlap_decode": True} | ({"num_kv_blocks": num_kv_blocks} if num_kv_blocks else {})
    llm = LLM(engine, **runtime)
    launched = record_launches(llm.engine)
    outs = llm.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert sum(launched) >= NEW_TOKENS // 2, "decode steps should have been pipelined"
    assert [o.token_ids for o in outs] == reference_tokens
    if num_kv_blocks:
        assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    stats = llm.engine.stats()
    assert stats.kv_free_blocks == stats.kv_blocks


def test_the_memory_plans_full_size_step_runs_on_the_engine(checkpoints, tmp_path):
    """The step the GPU pool sizing measures (max_num_tokens over max_batch_size sequences, all sampled)."""
    import torch

    from kiln.runtime import memory_plan
    from kiln.runtime.mm_runner import make_runner

    engine = LLM(build_tiny_engine(checkpoints("mistral"), tmp_path / "e")).engine
    program = engine.runner.program
    setup = memory_plan.StepSetup(
        engine.build,
        engine._cache_shape,
        torch.float32,
        engine.device,
        lambda cache, kv: make_runner(None, program, cache, kv, engine.device),
    )
    rows, cache_bytes = memory_plan.run_full_step(setup)
    assert rows == engine.build.max_batch_size == 4
    blocks = -(-engine.build.max_num_tokens // (4 * engine.build.tokens_per_block)) * 4
    assert cache_bytes == torch.Size(engine._cache_shape(blocks)).numel() * 4  # float32

    # The measurement around it (CUDA's counters faked here): the step's peak less its own cache.
    calls = []
    fake = {
        "synchronize": lambda device=None: calls.append("sync"),
        "reset_peak_memory_stats": lambda device=None: calls.append("reset"),
        "memory_allocated": lambda device=None: 1_000,
        "max_memory_allocated": lambda device=None: 1_000 + cache_bytes + 777,
        "empty_cache": lambda: calls.append("empty"),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, function in fake.items():
            patch.setattr(torch.cuda, name, function)
        assert memory_plan.step_peak_bytes(setup) == 777
    assert calls == ["sync", "reset", "sync", "empty"]
