"""KV-cache block pool: which cache blocks each sequence owns. Plain Python, no tensors."""

from __future__ import annotations

from collections import deque


class KVCacheManager:
    """Hands out fixed-size cache blocks; allocation is all-or-nothing and never overcommits."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Make `seq_id` own enough blocks for `num_tokens` tokens; False (and no change) if the pool is short."""
        table = self._tables.setdefault(seq_id, [])
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > len(self._free):
            if not table:
                del self._tables[seq_id]
            return False
        for _ in range(max(missing, 0)):
            table.append(self._free.popleft())
        return True

    def free(self, seq_id: str) -> None:
        for block in self._tables.pop(seq_id, []):
            self._free.append(block)

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def owners(self) -> dict[str, list[int]]:
        return {seq_id: list(table) for seq_id, table in self._tables.items()}
