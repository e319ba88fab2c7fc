"""KV-cache block pool with prefix caching: which cache blocks each sequence owns. Plain Python, no tensors.

Blocks are reference-counted. A block whose tokens are all computed can be *registered* under a key
(its parent block's identity, its token ids, and an optional extra key such as an image hash); a later
sequence whose prompt starts with the same chain of blocks attaches the registered blocks instead of
recomputing them. Lookups go through a hash of the key and are confirmed by comparing the whole key,
so a hash collision is a miss, never a wrong hit. The parent's identity is (block id, generation): when
a block is reused for other tokens its generation changes, so blocks chained to its old content can
never be reached again.

Freed blocks stay registered while they sit in the free queue (least recently freed first to be
reused), so a finished request's prompt can still be hit. Only full, computed blocks are shared;
a sequence's last (partial) block and every block it still writes to are its own.

Blocks never handed out yet cost nothing: they are the ids from `_next_fresh` on, so a pool of
millions of blocks (a small model on a large GPU) is as cheap to create as a small one. A block is
taken from, in order: freed blocks holding nothing reusable, never-used blocks, then registered
freed blocks, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

BlockKey = tuple[tuple[int, int] | None, tuple[int, ...], Hashable]


@dataclass
class _Block:
    ref_count: int = 0
    generation: int = 0
    key: BlockKey | None = None
    digest: int | None = None


@dataclass
class _Chain:
    """A sequence's registered prefix: how many of its leading blocks are registered or were hit."""

    num_blocks: int = 0
    parent: tuple[int, int] | None = None
    broken: bool = False  # a block could not be registered (collision): stop registering this chain


class KVCacheManager:
    """Hands out fixed-size cache blocks; allocation is all-or-nothing and never overcommits."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        hash_fn: Callable[[BlockKey], int] = hash,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash = hash_fn
        self._blocks: list[_Block] = []  # of the blocks handed out at least once (ids below _next_fresh)
        self._next_fresh = 0
        self._free: OrderedDict[int, None] = OrderedDict()  # freed blocks, unregistered ones first
        self._cached: dict[int, int] = {}  # digest -> block id
        self._tables: dict[str, list[int]] = {}
        self._chains: dict[str, _Chain] = {}

    # ---- state ------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no live sequence holds (some may still be registered for reuse)."""
        return len(self._free) + self.num_blocks - self._next_fresh

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def owners(self) -> dict[str, list[int]]:
        return {seq_id: list(table) for seq_id, table in self._tables.items()}

    def _meta(self, block: int) -> _Block:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside the pool of {self.num_blocks}")
        return self._blocks[block] if block < self._next_fresh else _Block()

    def ref_count(self, block: int) -> int:
        return self._meta(block).ref_count

    def is_registered(self, block: int) -> bool:
        return self._meta(block).key is not None

    # ---- allocation -------------------------------------------------------------------------------

    def match_prefix(self, seq_id: str, token_ids: Sequence[int], extra_keys: Sequence[Hashable] | None = None) -> int:
        """Attach the registered blocks that `token_ids` starts with to a sequence that holds none.

        Returns the number of tokens they cover. At least one token is always left to compute, so the
        step that follows produces logits. `extra_keys[i]`, when given, joins block i's key.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        chain = _Chain()
        self._chains[seq_id] = chain
        if not self.enable_prefix_caching:
            return 0
        table: list[int] = []
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            key: BlockKey = (chain.parent, tuple(token_ids[i * bs : (i + 1) * bs]), _extra(extra_keys, i))
            block = self._cached.get(self._hash(key))
            if block is None or self._blocks[block].key != key:
                break
            if self._blocks[block].ref_count == 0:
                del self._free[block]
            self._blocks[block].ref_count += 1
            table.append(block)
            chain.parent = (block, self._blocks[block].generation)
        chain.num_blocks = len(table)
        if table:
            self._tables[seq_id] = table
        return len(table) * bs

    def allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Make `seq_id` own enough blocks for `num_tokens` tokens; False (and no change) if the pool is short."""
        table = self._tables.get(seq_id, [])
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > self.num_free_blocks:
            return False
        if missing <= 0:
            return True
        for _ in range(missing):
            table.append(self._take_free_block())
        self._tables[seq_id] = table
        self._chains.setdefault(seq_id, _Chain())
        return True

    def _take_free_block(self) -> int:
        front = next(iter(self._free), None)
        if (front is None or self._blocks[front].key is not None) and self._next_fresh < self.num_blocks:
            block = self._next_fresh  # nothing unregistered was freed: a never-used block
            self._next_fresh += 1
            self._blocks.append(_Block(ref_count=1, generation=1))
            return block
        block, _ = self._free.popitem(last=False)
        meta = self._blocks[block]
        if meta.digest is not None:  # evict its old registration: its content is about to change
            del self._cached[meta.digest]
        meta.key = meta.digest = None
        meta.generation += 1
        meta.ref_count = 1
        return block

    def register_computed(
        self,
        seq_id: str,
        token_slice: Callable[[int, int], Sequence[int]],
        num_computed: int,
        extra_keys: Sequence[Hashable] | None = None,
    ) -> None:
        """Register the sequence's blocks whose tokens are all computed; `token_slice(a, b)` gives tokens [a, b).

        Cheap when no block filled up since the last call, so it can run after every step.
        """
        chain = self._chains.get(seq_id)
        table = self._tables.get(seq_id)
        if not self.enable_prefix_caching or chain is None or table is None or chain.broken:
            return
        bs = self.block_size
        for i in range(chain.num_blocks, min(num_computed // bs, len(table))):
            block = table[i]
            key: BlockKey = (chain.parent, tuple(token_slice(i * bs, (i + 1) * bs)), _extra(extra_keys, i))
            digest = self._hash(key)
            holder = self._cached.get(digest)
            if holder is None:
                self._cached[digest] = block
                self._blocks[block].key, self._blocks[block].digest = key, digest
            elif self._blocks[holder].key != key:  # a collision: leave this chain unshared from here on
                chain.broken = True
                return
            else:  # another block holds this exact content: ours stays private, the chain goes on from that one
                block = holder
            chain.parent = (block, self._blocks[block].generation)
            chain.num_blocks = i + 1

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks; registered ones stay reusable until the pool needs them."""
        self._chains.pop(seq_id, None)
        table = self._tables.pop(seq_id, [])
        for block in reversed(table):  # a sequence's tail is evicted before its (more shared) head
            meta = self._blocks[block]
            meta.ref_count -= 1
            if meta.ref_count == 0:
                self._free[block] = None
                if meta.key is None:  # nothing to reuse: first in line
                    self._free.move_to_end(block, last=False)

    def reset_prefix_cache(self) -> None:
        """Forget every registration of blocks no sequence holds."""
        for block in self._free:
            meta = self._blocks[block]
            if meta.digest is not None:
                del self._cached[meta.digest]
            meta.key = meta.digest = None
            meta.generation += 1


def _extra(extra_keys: Sequence[Hashable] | None, index: int) -> Hashable:
    return extra_keys[index] if extra_keys is not None and index < len(extra_keys) else None
