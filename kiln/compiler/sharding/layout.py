"""How a tensor-parallel engine splits a model's heads over its ranks, and the checks made before a build."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass(frozen=True)
class HeadSplit:
    """The attention heads one rank computes: query heads [q_start, q_start + q_heads), and the KV heads
    they read, [kv_start, kv_start + kv_heads) (one replicated head where the model has fewer than ranks)."""

    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int


def check_tp(tp_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int | None, what: str) -> None:
    """Refuse a split that does not divide: heads, KV heads (or ranks per KV head) and the MLP width."""
    problems = []
    if num_heads % tp_size:
        problems.append(f"{num_heads} attention heads do not divide over {tp_size} ranks")
    if num_kv_heads >= tp_size and num_kv_heads % tp_size:
        problems.append(f"{num_kv_heads} KV heads do not divide over {tp_size} ranks")
    if num_kv_heads < tp_size and tp_size % num_kv_heads:
        problems.append(f"{tp_size} ranks do not divide over {num_kv_heads} KV heads (for replicating them)")
    if intermediate_size is not None and intermediate_size % tp_size:
        problems.append(f"the MLP width {intermediate_size} does not divide over {tp_size} ranks")
    if problems:
        raise KilnError(f"{what} cannot be built with --tp-size {tp_size}: " + "; ".join(problems))


def head_split(rank: int, tp_size: int, num_heads: int, num_kv_heads: int) -> HeadSplit:
    q_heads = num_heads // tp_size
    q_start = rank * q_heads
    if num_kv_heads >= tp_size:
        kv_heads = num_kv_heads // tp_size
        return HeadSplit(q_start, q_heads, rank * kv_heads, kv_heads)
    group = num_heads // num_kv_heads  # query heads per KV head
    return HeadSplit(q_start, q_heads, q_start // group, 1)


def vocab_rows(rank: int, tp_size: int, vocab_size: int) -> tuple[int, int, int]:
    """(start, stop, padded rows) of this rank's vocabulary slice: ceil(vocab / tp) rows each, the last padded."""
    per = -(-vocab_size // tp_size)
    start = min(rank * per, vocab_size)
    return start, min(start + per, vocab_size), per
