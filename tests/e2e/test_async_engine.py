"""The server's engine thread: a failing step fails only the requests it ran, and serving goes on."""

from __future__ import annotations

import asyncio

import pytest

from kiln.runtime.engine import Engine
from kiln.sampling_params import SamplingParams
from kiln.serve.async_engine import AsyncEngine, RequestFailed, ServerStopping


async def run(engine: AsyncEngine, request_id: str, max_tokens: int = 5) -> list[int]:
    tokens: list[int] = []
    request = engine.engine.validate([5, 6, 7], SamplingParams(max_tokens=max_tokens, temperature=0))
    async for delta in engine.generate(request, request_id):
        tokens.extend(delta.token_ids)
    return tokens


def test_a_failed_step_fails_its_requests_frees_their_blocks_and_serving_goes_on(demo_engine):
    core = Engine(demo_engine)
    engine = AsyncEngine(core)
    real_run = core.runner.run
    calls = {"n": 0}

    def flaky(chunks, *patch):  # a pipelined decode step (CUDA) also passes the tokens to patch in
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return real_run(chunks, *patch)

    core.runner.run = flaky

    async def main() -> tuple[object, list[int]]:
        failed = await asyncio.gather(run(engine, "a"), return_exceptions=True)
        return failed[0], await run(engine, "b")

    try:
        failed, tokens = asyncio.run(main())
        assert isinstance(failed, RequestFailed) and "simulated device fault" in str(failed)
        assert len(tokens) == 5
        stats = core.stats()
        assert stats.kv_free_blocks == stats.kv_blocks and stats.requests == 0 and stats.running == 0
        assert engine.metrics.requests.labels(outcome="error")._value.get() == 1
    finally:
        engine.shutdown()
    assert not engine.is_alive


def test_no_new_requests_once_shutting_down(demo_engine):
    engine = AsyncEngine(Engine(demo_engine))
    engine.shutdown()
    with pytest.raises(ServerStopping):
        asyncio.run(run(engine, "late"))
