"""What a bench run may ask of an engine: shapes it cannot hold are refused before anything is timed.

A latency row times one batch decoding together, so every sequence must be in the running batch at
once: at most the engine's max_batch_size, and the KV pool must hold all of them at full length.
Beyond either, the scheduler would run the batch in waves (or preempt and recompute), and the
per-step numbers would describe a smaller batch than the row names.
"""

from __future__ import annotations

from kiln.config import BuildConfig
from kiln.errors import KilnError


def check_shapes(batch_sizes: tuple[int, ...], input_len: int, output_len: int, build: BuildConfig) -> None:
    """Refuse batch sizes and lengths the engine's build limits cannot run as asked."""
    if input_len > build.input_len or input_len + output_len > build.seq_len:
        raise KilnError(
            f"--input-len {input_len} + --output-len {output_len} does not fit this engine "
            f"(max_input_len {build.input_len}, max_seq_len {build.seq_len})"
        )
    too_big = [b for b in batch_sizes if b > build.max_batch_size]
    if too_big:
        raise KilnError(
            f"--batch-sizes {','.join(map(str, too_big))}: more sequences than this engine's max_batch_size "
            f"({build.max_batch_size}) runs in waves, and its per-step numbers would be wrong; ask for at most "
            f"{build.max_batch_size}, or rebuild with a larger --max-batch-size"
        )


def blocks_per_sequence(input_len: int, output_len: int, block_size: int) -> int:
    """KV blocks one sequence holds at its full length (the last token's block included)."""
    return -(-(input_len + output_len) // block_size)


def check_kv_pool(
    batch_sizes: tuple[int, ...], input_len: int, output_len: int, kv_blocks: int, block_size: int
) -> None:
    """Refuse batch sizes whose sequences, at full length, need more KV blocks than the pool has."""
    per_seq = blocks_per_sequence(input_len, output_len, block_size)
    fits = kv_blocks // per_seq
    too_big = [b for b in batch_sizes if b > fits]
    if too_big:
        raise KilnError(
            f"--batch-sizes {','.join(map(str, too_big))}: the KV-cache pool ({kv_blocks} blocks of {block_size} "
            f"tokens) holds only {fits} sequence(s) of {input_len} + {output_len} tokens at once; the rest would "
            f"wait or be preempted and the numbers would be wrong. Ask for at most {fits}, shorter lengths, "
            "or a larger pool (--num-kv-blocks, --kv-cache-memory-fraction)"
        )
