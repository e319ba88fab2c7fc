"""The KV pool's memory plan: the full-size step it measures and the blocks left for the pool."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from kiln.config import BuildConfig
from kiln.runtime import memory_plan


def _build(**limits) -> BuildConfig:
    base = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64, "max_num_tokens": 64}
    return BuildConfig(**{**base, **limits})


@pytest.mark.parametrize(("batch", "tokens"), [(4, 64), (256, 8192), (8, 8), (3, 100)])
def test_full_step_fills_the_token_budget_over_the_most_sequences(batch, tokens):
    chunks = memory_plan.full_step(_build(max_batch_size=batch, max_num_tokens=tokens))
    assert len(chunks) == min(batch, tokens)
    assert sum(c.num_tokens for c in chunks) == tokens
    assert all(c.start == 0 and c.completes for c in chunks)  # every sequence is sampled
    assert max(c.num_tokens for c in chunks) - min(c.num_tokens for c in chunks) <= 1
    assert all(c.seq.params.top_k > 0 and c.seq.params.top_p < 1 for c in chunks)  # the costly sampling path


def test_pool_keeps_the_step_and_the_headroom_free():
    gib = 2**30
    total, free, step, block = 80 * gib, 64 * gib, int(1.5 * gib), 2 * 2**20
    blocks = memory_plan.pool_blocks(free, total, step, block)
    kept = free - blocks * block
    headroom = memory_plan.HEADROOM_FRACTION * total
    assert step + headroom <= kept < step + headroom + block
    assert memory_plan.pool_blocks(gib, total, step, block) == 0  # nothing left: no negative pool


def test_too_little_memory_for_one_sequence_is_a_clear_error():
    with pytest.raises(Exception, match="fewer than one max_seq_len sequence needs") as small:
        memory_plan.check_holds_one_sequence(3, 4, 2**30, 2**29, other_bytes=2**29)
    assert "another engine" not in str(small.value)  # under 1 GiB held beforehand: not worth a hint
    with pytest.raises(Exception, match=r"this process held 3\.0 GiB of GPU tensors before .*another engine"):
        memory_plan.check_holds_one_sequence(3, 4, 2**30, 2**29, other_bytes=3 * 2**30)
    memory_plan.check_holds_one_sequence(4, 4, 2**30, 2**29, other_bytes=3 * 2**30)


class _Holder:
    def __init__(self) -> None:
        self.tensor = torch.ones(4)
        self.me = self  # a reference cycle: plain reference counting never frees it


def test_reclaim_frees_what_only_a_reference_cycle_keeps():
    enabled = gc.isenabled()
    gc.disable()  # the collector must not run by chance before reclaim does
    try:
        holder = weakref.ref(_Holder())
        assert holder() is not None
        memory_plan.reclaim(torch.device("cpu"))
        assert holder() is None
    finally:
        if enabled:
            gc.enable()
