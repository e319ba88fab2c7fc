"""The engine's public surface: validated requests in, updates out, stats() and abort(); no registry to reach into."""

from __future__ import annotations

import pytest

from kiln.errors import RequestError
from kiln.runtime.engine import Engine
from kiln.sampling_params import SamplingParams


def test_requests_stats_and_abort(demo_engine):
    engine = Engine(demo_engine)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a = engine.add_request(engine.validate([5, 6, 7], params), "a")
    b = engine.add_request(engine.validate([5, 6, 8], params), "b")
    with pytest.raises(RequestError, match="request id 'a' is already in use"):
        engine.add_request(engine.validate([9], params), "a")
    stats = engine.stats()
    assert (stats.requests, stats.waiting, stats.running) == (2, 2, 0)
    assert stats.kv_free_blocks == stats.kv_blocks and stats.kv_tokens == stats.kv_blocks * stats.kv_block_size

    updates = engine.step()  # both prompts in one step, one token each
    assert sorted(u.seq.request_id for u in updates) == ["a", "b"]
    stats = engine.stats()
    assert (stats.requests, stats.waiting, stats.running) == (2, 0, 2)
    assert stats.kv_free_blocks < stats.kv_blocks and stats.prefix_query_tokens == 6

    assert engine.abort("b") is b and b.finish_reason == "abort" and len(b.output_ids) == 1
    assert engine.abort("b") is None  # already gone
    assert engine.running_request_ids() == ["a"]
    tokens = [t for u in updates if u.seq is a for t in u.new_token_ids]
    while engine.has_unfinished():
        tokens += [t for u in engine.step() for t in u.new_token_ids]
    assert a.finish_reason == "length" and tokens == a.output_ids and len(tokens) == 6
    stats = engine.stats()
    assert stats.requests == 0 and stats.running == 0 and stats.kv_free_blocks == stats.kv_blocks
    assert engine.add_request(engine.validate([5, 6, 7], params), "a").request_id == "a"  # the id is free again
