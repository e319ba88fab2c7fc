"""Decode steps replayed as CUDA graphs give exactly the tokens of plain eager steps: the graphs take
a pipelined step's ids from the tokens sampled on the device and end with the greedy choice, which a
greedy batch uses as its tokens; a sampled batch's tokens are brought to the graphs' buffer first.
Needs a GPU (CUDA graphs); the CPU suite covers the packed inputs (tests/unit/test_decode_staging.py)."""

from __future__ import annotations

import pytest
import torch
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
    launched = []
    original = fast.engine._launch

    def spy(chunks, pending):
        launched.append(pending is not None)
        return original(chunks, pending)

    fast.engine._launch = spy
    got = [o.token_ids for o in fast.generate(prompts(), params)]
    assert sum(launched) >= 10, "decode steps should have been pipelined"
    assert got == want
    assert len(set(map(tuple, got))) == 3
