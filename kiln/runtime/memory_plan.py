"""How many KV-cache blocks a GPU holds: the memory left after the weights and one measured full-size step.

`num_blocks` decides the pool's size. A `RuntimeConfig.num_kv_blocks` given is taken as is (if it
holds one sequence); on CPU the pool holds a full batch twice over. On a GPU, by default
(`RuntimeConfig.kv_cache_memory_fraction` None) the engine runs one step at the build limits
before it allocates the pool: `max_num_tokens` tokens over up to `max_batch_size` sequences,
each yielding a sampled token (top-k/top-p sampling, the costliest path). The peak memory that step
allocates is kept free for every later step, plus `HEADROOM_FRACTION` of the device for allocator
slack and libraries' workspaces; the pool takes the rest. No later step can need more than that
step did: the scheduler never exceeds those limits.

A step that scores prompt tokens (`SamplingParams.prompt_logprobs`, `kiln.runtime.prompt_logprobs`)
returns a logits row for each scored token where the measured step returned one per sequence (at most
`max_scored_rows`: the scheduler scores 512 prompt tokens a step, or one whole image block), and
log-softmaxes them in float32 blocks; `prompt_logprob_bytes` is kept free for that too.

A vision-language engine's step is measured with every token an image token, reading a table of
`max_multimodal_len` feature rows (the features of the requests in flight, held on the device),
and its vision program is measured at its batch limit (`vision_peak_bytes`); the two never run
at once, so the larger peak is kept free.

Before any of that the engine calls `reclaim`: an engine the program has dropped but that sits in a
reference cycle (a method patched onto its own instance is enough) keeps its weights and its pool on
the GPU until Python's cycle collector happens to run, and the new engine would find no memory left.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kiln.config import BuildConfig, RuntimeConfig
from kiln.engine.manifest import ModelFacts
from kiln.errors import KilnError
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.prompt_logprobs import ROWS_PER_BLOCK, max_scored_rows
from kiln.runtime.sampler import sample
from kiln.runtime.scheduler import ScheduledChunk
from kiln.runtime.sequence import Sequence
from kiln.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kiln.engine.manifest import MultimodalFacts
    from kiln.models.vlm.base import ImageItem
    from kiln.runtime.multimodal import MultimodalPipeline

HEADROOM_FRACTION = 0.02  # of total device memory, left free beside the measured step

RunnerFactory = Callable[[torch.Tensor, KVCacheManager], ModelRunner]


@dataclass(frozen=True)
class ImageRows:
    """The prompt-embedding table a vision-language engine's steps read."""

    rows: int  # max_multimodal_len
    hidden_size: int
    position_rows: int  # 3 for M-RoPE

    @classmethod
    def of(cls, facts: MultimodalFacts | None) -> ImageRows | None:
        if facts is None:
            return None
        return cls(facts.max_multimodal_len, facts.hidden_size, facts.position_rows)


@dataclass(frozen=True)
class StepSetup:
    """What running a step on a temporary cache needs from the engine."""

    build: BuildConfig
    cache_shape: Callable[[int], tuple[int, ...]]  # num_blocks -> the KV-cache tensor's shape
    dtype: torch.dtype
    device: torch.device
    make_runner: RunnerFactory  # (cache, block manager) -> the engine's model runner on them
    images: ImageRows | None = None  # a vision-language engine: its step reads image features
    cache_dtype: torch.dtype | None = None  # the KV cache's (a narrow FP8 / int8 one); None: dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.cache_dtype or self.dtype


def reclaim(device: torch.device) -> None:
    """Free what this process no longer uses: objects reachable only through reference cycles (a dropped
    engine's weights and KV pool among them), then, on CUDA, the allocator's cached blocks, so that the
    driver's free-memory count includes both."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def full_step(build: BuildConfig) -> list[ScheduledChunk]:
    """The largest step the scheduler can plan: max_num_tokens prompt tokens over up to max_batch_size
    sequences, every chunk completing its sequence (so every sequence is sampled)."""
    tokens = build.max_num_tokens
    seqs = max(1, min(build.max_batch_size, tokens))
    base, extra = divmod(tokens, seqs)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_k=50, top_p=0.9, detokenize=False)
    chunks = []
    for i in range(seqs):
        length = base + (1 if i < extra else 0)
        seq = Sequence(f"memory-plan-{i}", [1] * length, params)
        chunks.append(ScheduledChunk(seq, 0, length))
    return chunks


def attach_images(chunks: list[ScheduledChunk], images: ImageRows, dtype: torch.dtype, device: torch.device) -> None:
    """Make every token of `chunks` an image token, all reading one table of `images.rows` feature rows
    (allocated here), so the step gathers a feature row per token, up to the table's size."""
    from kiln.runtime.multimodal import MultimodalData

    table = torch.zeros(max(1, images.rows), images.hidden_size, dtype=dtype, device=device)
    offset, size = 0, table.shape[0]
    for chunk in chunks:
        n = chunk.num_tokens
        offset = offset if offset + n <= size else 0  # a chunk reads one contiguous run of min(n, size) rows
        rows = (torch.arange(n) + offset) % size
        offset += n
        positions = torch.arange(n).expand(images.position_rows, -1) if images.position_rows > 1 else None
        chunk.seq.mm = MultimodalData(table, rows, (), positions=positions)


def run_full_step(setup: StepSetup) -> tuple[int, int]:
    """Run `full_step` on a temporary KV cache just large enough for it (freed on return):
    (rows sampled, bytes of that cache)."""
    chunks = full_step(setup.build)
    if setup.images is not None:
        attach_images(chunks, setup.images, setup.dtype, setup.device)
    bs = setup.build.tokens_per_block
    num_blocks = sum(-(-c.num_tokens // bs) for c in chunks)
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=False)
    for chunk in chunks:
        if not kv.allocate(chunk.seq.request_id, chunk.num_tokens):
            raise AssertionError("the temporary KV cache is sized to hold the full step")
    cache = torch.zeros(setup.cache_shape(num_blocks), dtype=setup.kv_dtype, device=setup.device)
    logits, sampled = setup.make_runner(cache, kv).run(chunks)
    seqs = [chunks[i].seq for i in sampled]
    empty: list[tuple[int, ...]] = [() for _ in seqs]
    tokens, _ = sample(logits, [s.params for s in seqs], empty, empty, [None] * len(seqs))
    return int(tokens.shape[0]), cache.numel() * cache.element_size()


def step_peak_bytes(setup: StepSetup) -> int:
    """Bytes `run_full_step` allocates at its peak beyond what was allocated before, its own cache left out."""
    torch.cuda.synchronize(setup.device)
    torch.cuda.reset_peak_memory_stats(setup.device)
    before = torch.cuda.memory_allocated(setup.device)
    _, cache_bytes = run_full_step(setup)
    torch.cuda.synchronize(setup.device)
    peak = torch.cuda.max_memory_allocated(setup.device) - before - cache_bytes
    torch.cuda.empty_cache()
    return peak


VISION_PLAN_SIDE = 448  # pixels of the square image the vision program's measured batch repeats


def vision_plan_items(pipeline: MultimodalPipeline) -> list[ImageItem]:
    """One image through the engine's own processor, repeated until its features fill
    `max_multimodal_len` rows: the largest batch the vision program runs (in
    `vision_batch_limit` slices). Empty for families whose images are input tensors."""
    from PIL import Image

    family, facts = pipeline.family, pipeline.facts
    if not family.loads_images:
        return []
    image = Image.new("RGB", (VISION_PLAN_SIDE, VISION_PLAN_SIDE), (120, 60, 200))
    prompt = f"{pipeline.image_token or ''} memory plan"
    processed = family.process(pipeline.processor, prompt, [image], facts.family_config)
    items = [item.to(pipeline.device, pipeline.dtype) for item in family.split_images(processed, facts.family_config)]
    with torch.inference_mode():
        rows = sum(f.shape[0] for f in family.encode(pipeline.program, items, facts.vision_batch_limit, pipeline.state,
                                                      facts.family_config))  # fmt: skip
    return items * max(1, facts.max_multimodal_len // max(rows, 1))


def vision_peak_bytes(pipeline: MultimodalPipeline) -> int:
    """Bytes the vision program allocates at its peak encoding `vision_plan_items` (features included)."""
    items = vision_plan_items(pipeline)
    if not items:
        return 0
    device, facts = pipeline.device, pipeline.facts
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        features = pipeline.family.encode(
            pipeline.program, items, facts.vision_batch_limit, pipeline.state, facts.family_config
        )
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del features
    torch.cuda.empty_cache()
    return peak


def prompt_logprob_bytes(build: BuildConfig, vocab_size: int, images: ImageRows | None = None) -> int:
    """Bytes a step scoring prompt tokens needs that the measured step did not: logits (counted as float32)
    for every row it can score (`max_scored_rows`), and the float32 copy and log-softmax of one block of them."""
    rows = max_scored_rows(build.max_num_tokens, images.rows if images is not None else 0)
    return (rows + 2 * min(ROWS_PER_BLOCK, rows)) * vocab_size * 4


def pool_blocks(free_bytes: int, total_bytes: int, step_bytes: int, block_bytes: int) -> int:
    """Blocks that fit in `free_bytes` once a step's peak and the headroom are kept free."""
    headroom = int(HEADROOM_FRACTION * total_bytes)
    return max(0, free_bytes - step_bytes - headroom) // block_bytes


def check_holds_one_sequence(
    blocks: int, blocks_per_seq: int, free_bytes: int, reserved_bytes: int, other_bytes: int = 0
) -> None:
    """Raise a clear error when the pool cannot hold one sequence of max_seq_len.

    other_bytes: GPU memory that live tensors of this process held before the engine began to load
    (another engine still referenced, say); the message names it when it is 1 GiB or more."""
    if blocks < blocks_per_seq:
        hint = (
            f"; this process held {other_bytes / 2**30:.1f} GiB of GPU tensors before this engine loaded "
            "(another engine still loaded? drop every reference to it first)"
            if other_bytes >= 2**30
            else ""
        )
        raise KilnError(
            f"GPU memory left for the KV cache ({free_bytes / 2**30:.1f} GiB free, {reserved_bytes / 2**30:.1f} GiB "
            f"of it kept free for the steps) holds {blocks} blocks, fewer than one max_seq_len "
            f"sequence needs ({blocks_per_seq}); lower max_seq_len or max_num_tokens, or free memory{hint}"
        )


def num_blocks(
    setup: StepSetup,
    facts: ModelFacts,
    runtime: RuntimeConfig,
    *,
    vision: MultimodalPipeline | None = None,
    held_before: int = 0,
) -> int:
    """KV-cache blocks of the engine's pool; `vision`: a vision-language engine's pipeline, whose program runs
    between steps (the larger of the two peaks is kept free); `held_before`: bytes of GPU tensors held before
    the engine loaded."""
    build = setup.build
    blocks_per_seq = -(-build.seq_len // build.tokens_per_block)
    needed = blocks_per_seq * build.max_batch_size
    if runtime.num_kv_blocks is not None:
        if runtime.num_kv_blocks < blocks_per_seq:
            raise KilnError(
                f"num_kv_blocks={runtime.num_kv_blocks} cannot hold one sequence of max_seq_len "
                f"{build.seq_len} ({blocks_per_seq} blocks of {build.tokens_per_block} tokens)"
            )
        return runtime.num_kv_blocks
    if setup.device.type != "cuda":
        # Room for a full batch, twice over so finished prompts stay cached for prefix reuse.
        return 2 * needed
    reclaim(setup.device)  # loading's temporaries, cached by the allocator, count as free
    per_block = (
        2 * facts.num_layers * build.tokens_per_block * facts.num_kv_heads * facts.head_dim * setup.kv_dtype.itemsize
    )
    fraction = runtime.kv_cache_memory_fraction
    if fraction is not None:
        free, _total = torch.cuda.mem_get_info(setup.device)
        fits = int(free * fraction) // per_block
    else:
        step = step_peak_bytes(setup) + prompt_logprob_bytes(build, facts.vocab_size, setup.images)
        if vision is not None:
            step = max(step, vision_peak_bytes(vision))
        free, total = torch.cuda.mem_get_info(setup.device)  # the step's memory has gone back
        fits = pool_blocks(free, total, step, per_block)
    check_holds_one_sequence(fits, blocks_per_seq, free, free - fits * per_block, other_bytes=held_before)
    return fits  # beyond a full batch, the rest holds finished prompts for prefix reuse
