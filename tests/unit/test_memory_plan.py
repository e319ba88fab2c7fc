"""The KV pool's memory plan: the full-size step it measures and the blocks left for the pool."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from manifests import manifest

from kiln.config import BuildConfig, RuntimeConfig
from kiln.errors import KilnError
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


# ---- num_blocks: the pool's size --------------------------------------------------------------------

FACTS = dataclasses.replace(manifest().model, head_dim=8, max_position_embeddings=64)  # 2 layers, 2 KV heads
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 2  # K and V, layers, tokens per block, heads, head_dim, float16


def _no_step(cache: torch.Tensor, kv: object) -> object:
    raise AssertionError("this pool size needs no measured step")


def _setup(device: str = "cpu", **limits) -> memory_plan.StepSetup:
    return memory_plan.StepSetup(_build(**limits), lambda n: (n,), torch.float16, torch.device(device), _no_step)


def _blocks(setup: memory_plan.StepSetup, vision: object = None, **runtime) -> int:
    return memory_plan.num_blocks(setup, FACTS, RuntimeConfig(**runtime), vision=vision)  # type: ignore[arg-type]


def test_a_given_pool_size_is_taken_if_it_holds_one_sequence():
    assert _blocks(_setup(), num_kv_blocks=4) == 4  # max_seq_len 64 = 4 blocks of 16
    with pytest.raises(KilnError, match=r"num_kv_blocks=3 cannot hold one sequence of max_seq_len 64 \(4 blocks"):
        _blocks(_setup(), num_kv_blocks=3)


def test_on_cpu_the_pool_holds_a_full_batch_twice():
    assert _blocks(_setup(max_batch_size=3)) == 2 * 3 * 4


@pytest.mark.parametrize("vision", [None, "a vision pipeline"])
def test_a_memory_fraction_sizes_the_pool_from_free_memory(monkeypatch, vision):
    # An explicit fraction wins, also for a vision-language engine (nothing is measured then).
    free, share = 1000 * BLOCK_BYTES + 123, 0.5
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    monkeypatch.setattr(memory_plan, "vision_peak_bytes", lambda pipeline: pytest.fail("measured"))
    blocks = _blocks(_setup("cuda"), vision, kv_cache_memory_fraction=share)
    assert blocks == int(free * share) // BLOCK_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * BLOCK_BYTES, 2 * free))
    few = int(3 * BLOCK_BYTES * share) // BLOCK_BYTES
    with pytest.raises(KilnError, match=rf"holds {few} blocks, fewer than one max_seq_len sequence needs \(4\)"):
        _blocks(_setup("cuda"), vision, kv_cache_memory_fraction=share)


@pytest.mark.parametrize(
    ("tokens", "vocab", "image_rows", "rows"),
    [
        (64, 320, 0, 64 + 2 * 64),  # fewer tokens a step than the scheduler's cap of 512 scored tokens
        (16, 1000, 0, 16 + 2 * 16),
        (8192, 128256, 0, 512 + 2 * 128),  # the cap, and one block of 128 rows log-softmaxed at once
        (8192, 128256, 2000, 2000 + 2 * 128),  # an image block is never split: scored whole
        (1024, 1000, 2000, 1024 + 2 * 128),
    ],
)
def test_a_step_scoring_prompt_tokens_has_float32_logits_for_every_row_kept_free(tokens, vocab, image_rows, rows):
    build = _build(max_num_tokens=tokens, max_batch_size=min(4, tokens))
    images = memory_plan.ImageRows(image_rows, 8, 1) if image_rows else None
    assert memory_plan.prompt_logprob_bytes(build, vocab, images) == rows * vocab * 4


PROMPT_LOGPROB_BLOCKS = (64 + 2 * 64) * FACTS.vocab_size * 4 // BLOCK_BYTES  # _build()'s 64 tokens: 120 blocks


@pytest.mark.parametrize(
    ("step", "vision", "kept"),
    [(300, None, 300 + PROMPT_LOGPROB_BLOCKS), (300, 700, 700), (900, 700, 900 + PROMPT_LOGPROB_BLOCKS)],
)
def test_the_measured_pool_keeps_the_larger_of_the_step_and_vision_peaks_free(monkeypatch, step, vision, kept):
    total = 20_000 * BLOCK_BYTES  # 2% headroom: 400 blocks
    free = 2000 * BLOCK_BYTES
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(memory_plan, "step_peak_bytes", lambda setup: step * BLOCK_BYTES)
    monkeypatch.setattr(memory_plan, "vision_peak_bytes", lambda pipeline: vision * BLOCK_BYTES)
    blocks = _blocks(_setup("cuda"), None if vision is None else "a vision pipeline")
    assert blocks == memory_plan.pool_blocks(free, total, kept * BLOCK_BYTES, BLOCK_BYTES)


def vlm_facts(hidden: int, rows: int, position_rows: int):  # type: ignore[no-untyped-def]
    from kiln.engine.manifest import MultimodalFacts

    return MultimodalFacts(
        image_token_id=5,
        hidden_size=hidden,
        max_multimodal_len=rows,
        vision_batch_limit=1,
        position_rows=position_rows,
        bidirectional_images=False,
        vision_compiled=False,
    )


def test_a_vision_language_step_reads_a_feature_row_per_token_from_the_whole_table():
    """The measured step of a VLM engine: every token an image token, the table of max_multimodal_len
    rows allocated inside the measurement, the step's mm_embeds one row per token (up to the table)."""
    from kiln.runtime.kv_cache import KVCacheManager
    from kiln.runtime.mm_runner import MultimodalModelRunner

    for table_rows, position_rows in ((24, 1), (200, 3)):
        images = memory_plan.ImageRows(rows=table_rows, hidden_size=8, position_rows=position_rows)
        chunks = memory_plan.full_step(_build())
        memory_plan.attach_images(chunks, images, torch.float32, torch.device("cpu"))
        tables = {id(c.seq.mm.embeds) for c in chunks}
        assert len(tables) == 1 and chunks[0].seq.mm.embeds.shape == (table_rows, 8)
        facts = vlm_facts(8, table_rows, position_rows)
        kv = KVCacheManager(64, 16, enable_prefix_caching=False)
        for c in chunks:
            assert kv.allocate(c.seq.request_id, c.num_tokens)
        runner = MultimodalModelRunner(None, torch.zeros(1), kv, torch.device("cpu"), facts, torch.float32)  # type: ignore[arg-type]
        inputs, sampled = runner.prepare(chunks)
        tokens = sum(c.num_tokens for c in chunks)
        assert len(sampled) == 4
        assert inputs[8].shape[0] == sum(min(c.num_tokens, table_rows) for c in chunks)
        assert bool((inputs[9] >= 0).all()), "every token reads a feature row"
        assert inputs[1].shape == ((position_rows, tokens) if position_rows > 1 else (tokens,))


def test_image_rows_follow_the_manifest():
    assert memory_plan.ImageRows.of(None) is None
    facts = vlm_facts(64, 576, 3)
    assert memory_plan.ImageRows.of(facts) == memory_plan.ImageRows(576, 64, 3)


def test_the_vision_plan_fills_max_multimodal_len_rows(tmp_path):
    """The vision program's measured batch: one image through the engine's own processor, repeated
    until its features fill max_multimodal_len rows (CPU: the items, not the CUDA peak)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vlm_checkpoints import make_vlm_checkpoint

    from kiln import LLM, build

    checkpoint = make_vlm_checkpoint("llava", tmp_path / "ckpt")
    limits = dict(max_batch_size=4, max_input_len=200, max_seq_len=256, max_num_tokens=256)
    engine = build(checkpoint, tmp_path / "engine", compile=False, progress=False, **limits)
    pipeline = LLM(engine).engine.multimodal
    assert pipeline is not None
    items = memory_plan.vision_plan_items(pipeline)
    facts = pipeline.facts
    with torch.inference_mode():
        features = pipeline.family.encode(
            pipeline.program, items, facts.vision_batch_limit, pipeline.state, facts.family_config
        )
    rows = sum(f.shape[0] for f in features)
    per_image = features[0].shape[0]
    assert facts.max_multimodal_len - per_image < rows <= facts.max_multimodal_len
    assert len(items) >= facts.vision_batch_limit  # the program runs at least one full batch
