"""A vision-language decode step's extra inputs: what the CUDA graphs feed from static buffers must be
what the eager path computes for the same rows (one zero embedding row, mm_index -1, M-RoPE
positions p + delta on every row, attend_end p + 1), and rows the graphs cannot take are named."""

from __future__ import annotations

import pytest
import torch

from kiln.engine.manifest import MultimodalFacts
from kiln.runtime.cuda_graphs import DecodeExtras
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.mm_runner import MultimodalModelRunner, decode_extras, decode_position
from kiln.runtime.multimodal import ImageSpan, MultimodalData
from kiln.runtime.scheduler import ScheduledChunk
from kiln.runtime.sequence import Sequence
from kiln.sampling_params import SamplingParams

HIDDEN = 8
PROMPT_LEN = 12
IMAGE = (3, 9)  # image tokens 3..8


def facts(position_rows: int, bidirectional: bool) -> MultimodalFacts:
    return MultimodalFacts(
        image_token_id=5,
        hidden_size=HIDDEN,
        max_multimodal_len=16,
        vision_batch_limit=2,
        position_rows=position_rows,
        bidirectional_images=bidirectional,
        vision_compiled=False,
    )


def image_data(mrope: bool, seed: int) -> MultimodalData:
    gen = torch.Generator().manual_seed(seed)
    first, stop = IMAGE
    rows = torch.full((PROMPT_LEN,), -1, dtype=torch.int64)
    rows[first:stop] = torch.arange(stop - first)
    positions, delta = None, 0
    if mrope:  # image tokens on a 2 x 3 grid at t = 3, text after it resumes at 6
        t = torch.arange(PROMPT_LEN)
        positions = torch.stack([t, t, t])
        positions[:, first:stop] = torch.tensor([[3] * 6, [3, 3, 3, 4, 4, 4], [3, 4, 5, 3, 4, 5]])
        positions[:, stop:] = torch.arange(6, 6 + PROMPT_LEN - stop)
        delta = 6 - stop
    return MultimodalData(
        embeds=torch.randn(stop - first, HIDDEN, generator=gen),
        rows=rows,
        spans=(ImageSpan(first, stop, "img"),),
        blocks=(IMAGE,),
        positions=positions,
        position_delta=delta,
    )


def decode_chunks(kv: KVCacheManager, mms: list[MultimodalData | None], outputs: list[int]) -> list[ScheduledChunk]:
    """One decode row per sequence, after `outputs[i]` generated tokens (0: the last prompt token again)."""
    chunks = []
    for i, (mm, generated) in enumerate(zip(mms, outputs)):
        seq = Sequence(f"r{i}", list(range(10, 10 + PROMPT_LEN)), SamplingParams(max_tokens=8), mm=mm)
        seq.output_ids = list(range(20, 20 + generated))
        assert kv.allocate(seq.request_id, seq.num_tokens)
        chunks.append(ScheduledChunk(seq, seq.num_tokens - 1, 1))
    return chunks


@pytest.mark.parametrize("rows,bidirectional", [(1, False), (1, True), (3, False)], ids=["llava", "gemma3", "qwen"])
def test_eager_inputs_of_a_decode_step_are_the_graphs_static_ones(rows, bidirectional):
    f = facts(rows, bidirectional)
    kv = KVCacheManager(16, 4, enable_prefix_caching=False)
    runner = MultimodalModelRunner(None, torch.zeros(1), kv, torch.device("cpu"), f, torch.float32)  # type: ignore[arg-type]
    mms = [image_data(rows > 1, 0), None, image_data(rows > 1, 1)]
    chunks = decode_chunks(kv, mms, [3, 1, 0])
    positions = runner.decode_positions(chunks)
    assert positions is not None
    inputs, sampled = runner.prepare(chunks)
    assert sampled == [0, 1, 2]
    p = torch.tensor([c.start for c in chunks])
    delta = torch.tensor([mm.position_delta if mm is not None and rows > 1 else 0 for mm in mms])
    assert positions == (p + delta).tolist()
    extra = inputs[8:]
    assert torch.equal(extra[0], torch.zeros(1, HIDDEN)), "mm_embeds: one zero row"
    assert torch.equal(extra[1], torch.full((3,), -1)), "mm_index: no image row"
    want_positions = torch.tensor(positions)
    if rows > 1:
        assert torch.equal(inputs[1], want_positions.expand(rows, -1))
    else:
        assert torch.equal(inputs[1], want_positions)
    if bidirectional:
        assert len(extra) == 3 and torch.equal(extra[2], p + 1), "attend_end: p + 1"
        assert torch.equal(inputs[4].long(), p + 1)  # = seq_lens, which the graphs copy into attend_end
    else:
        assert len(extra) == 2


def test_rows_the_graphs_cannot_take_are_named():
    mm = image_data(mrope=True, seed=2)
    assert decode_position(None, 17) == 17
    assert decode_position(mm, PROMPT_LEN + 4) == PROMPT_LEN + 4 + mm.position_delta
    assert decode_position(mm, PROMPT_LEN - 1) == int(mm.positions[0, PROMPT_LEN - 1])  # a text prompt token
    assert decode_position(mm, IMAGE[0]) is None  # an image token reads its feature row
    plain = image_data(mrope=False, seed=3)
    assert decode_position(plain, IMAGE[1] - 1) is None
    assert decode_position(plain, PROMPT_LEN - 1) == PROMPT_LEN - 1


def test_decode_extras_follow_the_manifest():
    assert decode_extras(None, torch.bfloat16) is None
    assert decode_extras(facts(3, False), torch.bfloat16) == DecodeExtras(HIDDEN, torch.bfloat16, 3, False)
    assert decode_extras(facts(1, True), torch.float16) == DecodeExtras(HIDDEN, torch.float16, 1, True)
