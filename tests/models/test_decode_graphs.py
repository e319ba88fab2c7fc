"""Decode steps replayed as CUDA graphs, pipelined (launched before the step before's tokens are read,
taking them from the device), give exactly the tokens of plain eager steps, greedy and sampled, while
the batch shrinks across graph buckets. Needs a GPU (CUDA graphs)."""

from __future__ import annotations

import pytest
import torch
from launch_spy import record_launches
from test_families import prompts
from tiny_checkpoints import build_tiny_engine

from kiln import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_graph_steps_give_the_tokens_of_eager_steps(checkpoints, tmp_path, temperature):
    engine = build_tiny_engine(checkpoints("llama"), tmp_path / "e", device="cuda", tokens_per_block=4)
    # Requests ending at different steps: the decode batch shrinks from 3 rows to 1, across graph buckets.
    params = [
        SamplingParams(max_tokens=n, temperature=temperature, seed=seed, ignore_eos=True)
        for seed, n in enumerate((5, 12, 20))
    ]
    plain = LLM(engine, cuda_graphs=False, overlap_decode=False)
    want = [o.token_ids for o in plain.generate(prompts(), params)]
    del plain
    fast = LLM(engine)
    assert fast.engine.runner.graphs is not None and fast.engine.overlap_decode
    launched = record_launches(fast.engine)
    got = [o.token_ids for o in fast.generate(prompts(), params)]
    assert sum(launched) >= 10, "decode steps should have been pipelined"
    assert got == want
    assert len(set(map(tuple, got))) == 3
