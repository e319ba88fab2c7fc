"""Vision-language engines on the fast path: decode steps of prompts with images replay CUDA graphs
and are pipelined, and give exactly the tokens of plain eager steps (greedy and sampled), for a
LLaVA-style program, Gemma 3 (attend_end) and Qwen2.5-VL (M-RoPE positions). Needs a GPU."""

from __future__ import annotations

import pytest
import torch
from launch_spy import record_launches
from test_vlm_families import LIMITS, batch_for
from vlm_checkpoints import make_vlm_checkpoint

from kiln import LLM, SamplingParams, build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_5_vl"])
@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_vlm_graph_steps_give_the_tokens_of_eager_steps(family, temperature, tmp_path):
    checkpoint = make_vlm_checkpoint(family, tmp_path / "ckpt")
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, device="cuda", **LIMITS)
    batch = batch_for(family)
    # Requests ending at different steps: the decode batch shrinks across graph buckets.
    params = [
        SamplingParams(max_tokens=n, temperature=temperature, seed=seed, ignore_eos=True)
        for seed, n in enumerate((6, 14, 20, 9)[: len(batch)])
    ]
    plain = LLM(engine, cuda_graphs=False, overlap_decode=False)
    want = [o.token_ids for o in plain.generate(batch, params)]
    del plain
    fast = LLM(engine)
    graphs = fast.engine.runner.graphs
    assert graphs is not None and fast.engine.overlap_decode
    replays = []
    run = graphs.run
    graphs.run = lambda *args, **kwargs: replays.append(1) or run(*args, **kwargs)  # type: ignore[method-assign]
    launched = record_launches(fast.engine)
    got = [o.token_ids for o in fast.generate(batch, params)]
    del graphs.run
    assert sum(launched) >= 10, "decode steps of prompts with images should have been pipelined"
    assert len(replays) >= 15, "decode steps of prompts with images should have replayed graphs"
    assert got == want
