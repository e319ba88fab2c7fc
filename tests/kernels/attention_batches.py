"""Random paged-attention batches for the kernel tests: fresh random values, shuffled blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    layer: int

    def args(self) -> tuple:
        return (
            self.q,
            self.k,
            self.v,
            self.kv_cache,
            self.slot_mapping,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.layer,
        )

    def clone(self) -> Batch:
        return replace(self, kv_cache=self.kv_cache.clone())

    def to(self, dtype: torch.dtype) -> Batch:
        """The same batch with q, k, v and the cache cast (metadata unchanged)."""
        return replace(
            self, q=self.q.to(dtype), k=self.k.to(dtype), v=self.v.to(dtype), kv_cache=self.kv_cache.to(dtype)
        )


def make_batch(
    shapes: list[tuple[int, int]],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
    padding_tokens: int = 0,
    num_layers: int = 2,
    layer: int = 1,
) -> Batch:
    """shapes: (cached tokens, new tokens) per sequence. The cached keys sit in the cache already;
    the new ones are in k/v with their slots. Unused blocks and table entries hold random garbage
    and random block ids; `padding_tokens` extra tokens with slot -1 belong to no sequence."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [math.ceil((c + n) / block_size) for c, n in shapes]
    num_blocks = sum(blocks_needed) + 7
    cache = torch.randn(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(max(blocks_needed), 1) + 1
    tables, slots = [], []
    for (cached, new), need in zip(shapes, blocks_needed):
        table = [free.pop() for _ in range(need)]
        # entries past the sequence point at random (other sequences') blocks: they must never matter
        tables.append(table + torch.randint(0, num_blocks, (width - need,), generator=gen).tolist())
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
    num_tokens = len(slots) + padding_tokens
    slots += [-1] * padding_tokens
    new_counts = torch.tensor([n for _, n in shapes])
    return Batch(
        q=torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(device, dtype),
        k=torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype),
        v=torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype),
        kv_cache=cache.to(device, dtype),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([c + n for c, n in shapes], dtype=torch.int32, device=device),
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int64), new_counts.cumsum(0)]).to(device, torch.int32),
        layer=layer,
    )
