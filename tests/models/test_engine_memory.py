"""A CUDA engine's KV pool takes the GPU's free memory, so an engine the program dropped must give
its memory back before the next one is sized, even when only a reference cycle keeps it alive and
Python's cycle collector has not run. Needs a GPU (the pool is sized from the device's free memory)."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_checkpoints import build_tiny_engine

from kiln import LLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the KV pool is sized from GPU memory")


def test_a_dropped_engine_in_a_reference_cycle_leaves_its_memory_to_the_next(checkpoints, tmp_path):
    engine = build_tiny_engine(checkpoints("llama"), tmp_path / "e", device="cuda", tokens_per_block=4)
    enabled = gc.isenabled()
    gc.disable()  # as when the collector's thresholds have not been reached since the first engine was dropped
    try:
        first = LLM(engine, cuda_graphs=False)
        blocks = first.engine.stats().kv_blocks
        first.engine.itself = first.engine  # a cycle, as a method patched onto the instance makes
        del first
        second = LLM(engine, cuda_graphs=False)
        assert second.engine.stats().kv_blocks >= 0.95 * blocks
    finally:
        if enabled:
            gc.enable()
